"""Every Python example and command of the threaded workers guide, verbatim, against this project.

The guide's code blocks are copied below unchanged (``test_blocks_are_verbatim`` compares them with
the guide when shared/seeds is present). Fragments that the guide shows as methods are run as
methods: their text is indented into a class body, never edited.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shlex
import signal
import subprocess
import textwrap
import threading
import time
from contextlib import redirect_stdout

import numpy as np
import pytest

from snakepit_bridge import thread_safety_checker as tsc
from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method, tool
from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker
from tests.servers import ROOT, WorkerServer

GUIDE = ROOT.parent / "shared" / "seeds" / "snakepit-threaded-workers-guide.md"

QUICK_START = r'''python grpc_server_threaded.py \
    --port 50052 \
    --adapter snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter \
    --elixir-address localhost:50051 \
    --max-workers 16 \
    --thread-safety-check
'''

PATTERN_1 = r'''class MyAdapter(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self):
        super().__init__()
        # Safe: Loaded once, never modified
        self.model = load_pretrained_model()
        self.config = {"timeout": 30, "batch_size": 10}
'''

PATTERN_2 = r'''@thread_safe_method
def predict(self, input_data):
    # Safe: Each thread has its own cache
    cache = self.get_thread_local('cache', {})

    if input_data in cache:
        return cache[input_data]

    result = self.model.predict(input_data)

    # Update thread-local cache
    cache[input_data] = result
    self.set_thread_local('cache', cache)

    return result
'''

PATTERN_3 = r'''@thread_safe_method
def log_prediction(self, prediction):
    # Safe: Protected by lock
    with self.acquire_lock():
        self.prediction_log.append({
            "prediction": prediction,
            "timestamp": time.time()
        })
        self.total_predictions += 1
'''

STEP_1 = r'''from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method, tool

class MyAdapter(ThreadSafeAdapter):
    __thread_safe__ = True  # Required declaration
'''

STEP_2 = r'''def __init__(self):
    super().__init__()  # Initialize base class

    # Pattern 1: Shared read-only
    self.model = load_model()

    # Pattern 3: Shared mutable (will need locking)
    self.request_count = 0
    self.results = []
'''

STEP_3 = r'''@thread_safe_method
@tool(description="Thread-safe prediction")
def predict(self, input_data: str) -> dict:
    # Method is automatically tracked and protected
    result = self.model.predict(input_data)

    # Update shared state with lock
    with self.acquire_lock():
        self.request_count += 1

    return {"prediction": result}
'''

STEP_4 = r'''@thread_safe_method
def get_stats(self) -> dict:
    # Read shared mutable state safely
    with self.acquire_lock():
        return {
            "request_count": self.request_count,
            "results_count": len(self.results)
        }
'''

METHOD_1 = r'''from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker

# Enable checking
checker = ThreadSafetyChecker(enabled=True, strict_mode=False)

# Run your tests
def test_concurrent_access():
    adapter = MyAdapter()

    def make_request(i):
        adapter.predict(f"input_{i}")

    threads = [threading.Thread(target=make_request, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Get report
    report = checker.get_report()
    print(report)
'''

METHOD_2 = r'''import concurrent.futures

def stress_test_adapter():
    adapter = MyAdapter()

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as executor:
        futures = [executor.submit(adapter.predict, f"input_{i}") for i in range(1000)]
        results = [f.result() for f in futures]

    assert len(results) == 1000
    print("Stress test passed!")
'''

METHOD_3 = r'''def test_race_conditions():
    adapter = MyAdapter()
    results = []

    def increment():
        for _ in range(1000):
            # This WILL have race conditions without locking!
            adapter.counter += 1

    threads = [threading.Thread(target=increment) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # If thread-unsafe, counter will be < 10000
    print(f"Counter: {adapter.counter} (expected: 10000)")
    assert adapter.counter == 10000, "Race condition detected!"
'''

PERF_NUMPY = r'''import numpy as np

@thread_safe_method
def matrix_multiply(self, data):
    # This releases GIL - true parallel execution!
    arr = np.array(data)
    result = np.dot(arr, self.weights)
    return result.tolist()
'''

PERF_POOL_SIZING = r'''# Rule of thumb: threads = CPU cores × 2
# For 8-core machine:
--max-workers 16
'''

PERF_LOCK_CONTENTION = r'''# BAD: Lock held during computation
with self.acquire_lock():
    result = expensive_computation()  # Blocks other threads!
    self.results.append(result)

# GOOD: Lock only for shared state update
result = expensive_computation()  # No lock - other threads run
with self.acquire_lock():
    self.results.append(result)  # Lock held briefly
'''

PERF_THREAD_LOCAL_CACHE = r'''@thread_safe_method
def compute(self, key):
    # Check thread-local cache first (no lock!)
    cache = self.get_thread_local('cache', {})
    if key in cache:
        return cache[key]

    # Compute and cache
    result = expensive_function(key)
    cache[key] = result
    self.set_thread_local('cache', cache)

    return result
'''

PITFALL_1 = r'''# ❌ WRONG: Race condition!
@thread_safe_method
def increment(self):
    self.counter += 1  # NOT thread-safe!

# ✅ CORRECT:
@thread_safe_method
def increment(self):
    with self.acquire_lock():
        self.counter += 1
'''

PITFALL_2 = r'''# ❌ WRONG: Lock held during NumPy operation
with self.acquire_lock():
    result = np.dot(large_matrix_a, large_matrix_b)  # Blocks threads!

# ✅ CORRECT: Compute first, then lock for state update
result = np.dot(large_matrix_a, large_matrix_b)
with self.acquire_lock():
    self.results.append(result)
'''

PITFALL_3 = r'''# ❌ WRONG: Pandas is NOT thread-safe
import pandas as pd

@thread_safe_method
def process_data(self, data):
    df = pd.DataFrame(data)
    return df.groupby('category').sum()  # Race conditions!

# ✅ CORRECT: Use thread-local DataFrames or locking
@thread_safe_method
def process_data(self, data):
    with self.acquire_lock():
        df = pd.DataFrame(data)
        return df.groupby('category').sum()
'''

PITFALL_4 = r'''# ❌ WRONG: Missing declaration
class MyAdapter(ThreadSafeAdapter):
    # __thread_safe__ not declared!
    pass

# ✅ CORRECT:
class MyAdapter(ThreadSafeAdapter):
    __thread_safe__ = True
'''

PYTORCH = r'''import torch

class PyTorchAdapter(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self):
        super().__init__()
        # Shared read-only model
        self.model = torch.load("model.pt")
        self.model.eval()

        # Configure threading
        torch.set_num_threads(4)  # Per-thread parallelism

    @thread_safe_method
    def inference(self, input_tensor):
        # PyTorch releases GIL during forward pass
        with torch.no_grad():
            output = self.model(torch.tensor(input_tensor))
        return output.tolist()
'''

MONITORING = r'''@thread_safe_method
def get_thread_stats(self):
    return self.get_stats()
'''

DEBUG_COMMAND = r'''python grpc_server_threaded.py \
    --thread-safety-check  # Enable runtime validation
'''



# -- helpers ------------------------------------------------------------------------------------

class FakeModel:
    """What load_model()/load_pretrained_model() return in these tests: a pure, thread-safe model."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def predict(self, input_data):
        with self._lock:
            self.calls += 1
        return f"label-{sum(map(ord, str(input_data))) % 7}"


def load_model():
    return FakeModel()


def load_pretrained_model():
    return FakeModel()


def namespace(**extra):
    ns = {"ThreadSafeAdapter": ThreadSafeAdapter, "thread_safe_method": thread_safe_method, "tool": tool,
          "threading": threading, "time": time, "np": np, "load_model": load_model,
          "load_pretrained_model": load_pretrained_model, "__name__": "guide_examples"}
    ns.update(extra)
    return ns


def run(source: str, ns: dict, name: str) -> dict:
    exec(compile(source, f"<guide {name}>", "exec"), ns)
    return ns


def as_methods(*blocks: str) -> str:
    return "".join("\n" + textwrap.indent(block, "    ") for block in blocks)


def as_method_body(name: str, block: str) -> str:
    return f"\ndef {name}(self):\n" + textwrap.indent(block, "    ")


def split(block: str, marker: str) -> tuple[str, str]:
    wrong, _, right = block.partition(marker)
    assert right, marker
    return wrong, right


def race_attributes(checker):
    return {f["attribute"] for f in checker.get_report()["findings"] if f["kind"] == "unprotected_shared_state"}


@pytest.fixture
def checker():
    c = ThreadSafetyChecker(enabled=True, strict_mode=False)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_checker_left_behind():
    yield
    active = tsc.get_active_checker()
    if active is not None:
        active.close()


def hammer(fn, n_threads=8, per_thread=25):
    errors = []

    def work(t):
        for i in range(per_thread):
            try:
                fn(t, i)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return errors


# -- the blocks are the guide's -----------------------------------------------------------------

BLOCKS = {name: value for name, value in dict(globals()).items()
          if name.isupper() and isinstance(value, str) and name not in ("GUIDE",)}


@pytest.mark.skipif(not GUIDE.exists(), reason="shared/seeds is not beside this checkout")
def test_blocks_are_verbatim_code_blocks_of_the_guide():
    fences = re.findall(r"```[a-z]*\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    for name, block in BLOCKS.items():
        assert block in fences, name


# -- thread safety patterns ---------------------------------------------------------------------

def test_patterns_1_and_2_shared_read_only_model_with_a_per_thread_cache(checker):
    ns = run(PATTERN_1 + as_methods(PATTERN_2), namespace(), "patterns 1+2")
    adapter = ns["MyAdapter"]()
    inputs = [f"input_{i % 10}" for i in range(25)]
    outputs = {}

    def call(t, i):
        outputs[(t, i)] = adapter.predict(inputs[i])

    assert hammer(call) == []
    model = FakeModel()
    assert all(outputs[(t, i)] == model.predict(inputs[i]) for t, i in outputs)
    assert adapter.model.calls == 8 * 10          # each thread computed each input once: its cache works
    assert checker.get_report()["findings"] == []


def test_pattern_3_locked_shared_log_and_counter(checker):
    header = textwrap.dedent("""
        class Logger(ThreadSafeAdapter):
            __thread_safe__ = True

            def __init__(self):
                super().__init__()
                self.prediction_log = []
                self.total_predictions = 0
        """)
    ns = run(header + as_methods(PATTERN_3), namespace(), "pattern 3")
    adapter = ns["Logger"]()
    assert hammer(lambda t, i: adapter.log_prediction(i)) == []
    assert adapter.get_stats()["total_requests"] == 200
    with adapter.acquire_lock():
        assert adapter.total_predictions == 200 and len(adapter.prediction_log) == 200
    assert checker.get_report()["findings"] == []


# -- writing thread-safe adapters: steps 1-4 make MyAdapter ---------------------------------------

def my_adapter_source() -> str:
    return STEP_1 + as_methods(STEP_2, STEP_3, STEP_4)


def test_steps_1_to_4_build_a_working_adapter_with_a_tool():
    ns = run(my_adapter_source(), namespace(), "steps 1-4")
    MyAdapter = ns["MyAdapter"]
    assert MyAdapter.__thread_safe__ is True
    assert "predict" in MyAdapter.tool_specs()
    assert MyAdapter.tool_specs()["predict"].description == "Thread-safe prediction"
    adapter = MyAdapter()
    assert adapter.predict("x") == {"prediction": FakeModel().predict("x")}
    assert adapter.get_stats() == {"request_count": 1, "results_count": 0}


def test_testing_method_1_checker_report_for_concurrent_access():
    ns = run(my_adapter_source(), namespace(), "steps 1-4")
    out = io.StringIO()
    with redirect_stdout(out):
        run(METHOD_1, ns, "method 1")          # creates the checker: it becomes the active one
        ns["test_concurrent_access"]()
    checker = ns["checker"]
    assert tsc.get_active_checker() is checker
    report = checker.get_report()
    assert "'findings': []" in out.getvalue()
    assert report["findings"] == []
    assert report["methods"]["MyAdapter.predict"]["calls"] == 100
    assert report["tracked_adapters"] == ["guide_examples.MyAdapter"]


def test_testing_method_2_stress_test_passes():
    ns = run(my_adapter_source(), namespace(), "steps 1-4")
    run(METHOD_2, ns, "method 2")
    out = io.StringIO()
    with redirect_stdout(out):
        ns["stress_test_adapter"]()
    assert out.getvalue() == "Stress test passed!\n"


def test_testing_method_3_the_race_is_detected(checker):
    """Without locking, `adapter.counter += 1` from ten threads is a race: the checker reports it
    every time; whether updates are actually lost on a given run depends on thread switches (it is
    likely with the checker's tracking on), and then the example's own assert fires."""
    header = STEP_1 + textwrap.indent(textwrap.dedent("""
        def __init__(self):
            super().__init__()
            self.counter = 0
        """), "    ")
    ns = run(header, namespace(), "method 3 adapter")
    run(METHOD_3, ns, "method 3")
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            ns["test_race_conditions"]()
        lost = False
    except AssertionError as exc:
        assert str(exc) == "Race condition detected!"
        lost = True
    counter = int(re.search(r"Counter: (\d+) \(expected: 10000\)", out.getvalue()).group(1))
    assert (counter < 10000) == lost and counter <= 10000
    assert race_attributes(checker) == {"counter"}


def test_my_adapter_serves_through_the_threaded_server_without_findings(tmp_path):
    module = tmp_path / "guide_my_adapter.py"
    module.write_text("import threading, time\n\n"
                      "class _Model:\n    def predict(self, x):\n        return str(x)[::-1]\n\n"
                      "def load_model():\n    return _Model()\n\n" + my_adapter_source())
    report = tmp_path / "report.json"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with WorkerServer("threaded", "--adapter", "guide_my_adapter.MyAdapter", "--max-workers", "8",
                      "--thread-safety-check", "--thread-safety-report", str(report), env=env) as server:
        client = server.client()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: client.execute("predict", {"input_data": f"ab{i}"}), range(80)))
        assert replies[5] == {"prediction": "5ba"}
        assert json.loads(client.stats().adapter_stats_json) == {"request_count": 80, "results_count": 0}
        server.terminate()
    assert json.loads(report.read_text())["findings"] == []


# -- performance ----------------------------------------------------------------------------------

def test_numpy_matrix_multiply_example(checker):
    header = textwrap.dedent("""
        import numpy as np

        class Mat(ThreadSafeAdapter):
            __thread_safe__ = True

            def __init__(self):
                super().__init__()
                self.weights = np.arange(12.0).reshape(4, 3)
        """)
    source = PERF_NUMPY.replace("import numpy as np\n\n", "", 1)
    assert PERF_NUMPY.startswith("import numpy as np\n\n")
    ns = run(header + as_methods(source), namespace(), "numpy")
    adapter = ns["Mat"]()
    results = {}
    assert hammer(lambda t, i: results.__setitem__((t, i), adapter.matrix_multiply([t, i, 1.0, 2.0]))) == []
    for (t, i), value in results.items():
        assert value == np.dot(np.array([t, i, 1.0, 2.0]), adapter.weights).tolist()
    assert checker.get_report()["findings"] == []


def test_thread_pool_sizing_flag_is_accepted():
    from snakepit_bridge.server.settings import parse_settings

    flags = [line for line in PERF_POOL_SIZING.splitlines() if not line.startswith("#")]
    assert parse_settings("threaded", shlex.split(" ".join(flags))).max_workers == 16


def test_reduce_lock_contention_example_is_correct_and_race_free(checker):
    header = textwrap.dedent("""
        class Contention(ThreadSafeAdapter):
            __thread_safe__ = True

            def __init__(self):
                super().__init__()
                self.results = []
        """)
    ns = run(header + textwrap.indent(as_method_body("both", PERF_LOCK_CONTENTION), "    "),
             namespace(expensive_computation=lambda: float(np.linalg.norm(np.ones(1000)))), "lock contention")
    adapter = ns["Contention"]()
    assert hammer(lambda t, i: adapter.both(), per_thread=10) == []
    assert len(adapter.results) == 8 * 10 * 2          # BAD and GOOD both append once
    assert checker.get_report()["findings"] == []


def test_thread_local_caching_example(checker):
    computed = []

    def expensive_function(key):
        computed.append(key)
        return key * 2

    header = textwrap.dedent("""
        class Cache(ThreadSafeAdapter):
            __thread_safe__ = True
        """)
    ns = run(header + as_methods(PERF_THREAD_LOCAL_CACHE), namespace(expensive_function=expensive_function),
             "thread-local cache")
    adapter = ns["Cache"]()
    assert hammer(lambda t, i: adapter.compute(i % 5), n_threads=4) == []
    assert len(computed) == 4 * 5                      # once per key per thread
    assert adapter.compute(3) == 6
    assert checker.get_report()["findings"] == []


# -- common pitfalls ------------------------------------------------------------------------------

PITFALL_ADAPTER = textwrap.dedent("""
    class Pitfall(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self.counter = 0
            self.results = []
    """)


@pytest.mark.parametrize("part", ["wrong", "correct"])
def test_pitfall_1_forgetting_to_lock(checker, part):
    wrong, correct = split(PITFALL_1, "\n# ✅ CORRECT:\n")
    ns = run(PITFALL_ADAPTER + as_methods(wrong if part == "wrong" else correct), namespace(), "pitfall 1")
    adapter = ns["Pitfall"]()
    assert hammer(lambda t, i: adapter.increment()) == []
    assert race_attributes(checker) == ({"counter"} if part == "wrong" else set())
    if part == "correct":
        assert adapter.counter == 200


@pytest.mark.parametrize("part", ["wrong", "correct"])
def test_pitfall_2_locking_around_numpy(checker, part):
    wrong, correct = split(PITFALL_2, "\n# ✅ CORRECT: Compute first, then lock for state update\n")
    body = as_method_body("step", wrong if part == "wrong" else correct)
    a, b = np.random.default_rng(0).standard_normal((2, 64, 64))
    ns = run(PITFALL_ADAPTER + textwrap.indent(body, "    "),
             namespace(large_matrix_a=a, large_matrix_b=b), "pitfall 2")
    adapter = ns["Pitfall"]()
    assert hammer(lambda t, i: adapter.step(), per_thread=5) == []
    assert race_attributes(checker) == set()
    if part == "correct":
        assert len(adapter.results) == 40 and np.allclose(adapter.results[0], a @ b)


@pytest.mark.parametrize("part", ["wrong", "correct"])
def test_pitfall_3_pandas(checker, part):
    pytest.importorskip("pandas")
    wrong, correct = split(PITFALL_3, "\n# ✅ CORRECT: Use thread-local DataFrames or locking\n")
    header = "import pandas as pd\n" + PITFALL_ADAPTER
    ns = run(header + as_methods(wrong.replace("import pandas as pd\n\n", "", 1) if part == "wrong" else correct),
             namespace(), "pitfall 3")
    adapter = ns["Pitfall"]()
    data = {"category": ["a", "b", "a"], "value": [1, 2, 3]}
    assert hammer(lambda t, i: adapter.process_data(data), per_thread=5) == []
    libs = [f for f in checker.get_report()["findings"] if f["kind"] == "unsafe_library"]
    if part == "wrong":
        assert [f["library"] for f in libs] == ["pandas"]
        assert libs[0]["message"].startswith("THREAD SAFETY: Unsafe library 'pandas' detected")
        assert libs[0]["tool"] == "process_data"
    else:
        assert libs == []


def test_pitfall_4_missing_declaration(checker, caplog):
    wrong, correct = split(PITFALL_4, "\n# ✅ CORRECT:\n")
    wrong_ns = run(wrong, namespace(), "pitfall 4 wrong")
    correct_ns = run(correct, namespace(), "pitfall 4 correct")
    with caplog.at_level("WARNING", logger="snakepit_bridge.thread_safety"):
        assert checker.check_declaration(wrong_ns["MyAdapter"]) is False
        assert checker.check_declaration(correct_ns["MyAdapter"]) is True
    assert "⚠️  Adapter MyAdapter does not declare thread safety." in caplog.text
    assert caplog.text.count("does not declare") == 1


def test_pytorch_example(tmp_path, monkeypatch, checker):
    """The guide's `torch.load("model.pt")` loads a whole pickled model. PyTorch 2.6 made
    `weights_only=True` the default, which refuses that; its documented switch back is the
    environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (only for model files you trust)."""
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)), "model.pt")
    ns = run(PYTORCH, namespace(), "pytorch")
    adapter = ns["PyTorchAdapter"]()
    outputs = []
    assert hammer(lambda t, i: outputs.append(adapter.inference([float(t), float(i), 0.0, 1.0])),
                  n_threads=4, per_thread=5) == []
    assert len(outputs) == 20 and all(len(o) == 2 for o in outputs)
    assert race_attributes(checker) == set()


def test_monitoring_get_thread_stats_example():
    header = textwrap.dedent("""
        class Monitored(ThreadSafeAdapter):
            __thread_safe__ = True
        """)
    ns = run(header + as_methods(MONITORING), namespace(), "monitoring")
    adapter = ns["Monitored"]()
    stats = adapter.get_thread_stats()
    assert {"total_requests", "active_requests", "max_workers", "thread_utilization"} <= set(stats)
    assert stats["total_requests"] == 1 and stats["active_requests"] == 1


# -- commands -------------------------------------------------------------------------------------

def run_command_until_ready(command: str, port: int):
    """Run a guide command with bash in the repository root; returns the process once ready."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    line = proc.stdout.readline()
    while line and not line.startswith("SNAKEPIT_READY") and time.monotonic() < deadline:
        line = proc.stdout.readline()
    if not line.startswith(f"SNAKEPIT_READY port={port} "):
        os.killpg(proc.pid, signal.SIGKILL)
        err = proc.stderr.read()
        if "already in use" in err:
            pytest.skip(f"port {port} is busy on this machine")
        raise AssertionError(f"{command!r} did not get ready: {err[-2000:]}")
    return proc


def stop(proc) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(30)


@pytest.mark.parametrize("block", ["QUICK_START", "DEBUG_COMMAND"])
def test_guide_commands_start_a_checked_threaded_server_on_port_50052(block):
    from snakepit_bridge.client import BridgeClient

    proc = run_command_until_ready(BLOCKS[block], 50052)
    try:
        with BridgeClient("127.0.0.1:50052") as client:
            # what the guide's Elixir call does: execute "compute_intensive" with %{data: [1,2,3]}
            result = client.execute("compute_intensive", {"data": [1, 2, 3]})
            assert result["input_size"] == 3 and isinstance(result["result"], float)
            stats = client.stats()
            assert stats.worker_mode == "threaded" and stats.max_workers == 16
            report = json.loads(stats.thread_safety_json)
            assert report["enabled"] is True and report["findings"] == []
            assert client.ping().adapter.endswith("ThreadedShowcaseAdapter")
    finally:
        assert stop(proc) == 0
