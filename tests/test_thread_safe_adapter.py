"""ThreadSafeAdapter, @thread_safe_method and the threaded server's declaration gate."""
from __future__ import annotations

import concurrent.futures
import inspect
import json
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from snakepit_bridge.adapter import discover_tools
from snakepit_bridge.base_adapter_threaded import (LockTimeoutError, ThreadSafeAdapter, UnsafeAdapterError,
                                                   is_declared_thread_safe, require_thread_safe_declaration,
                                                   thread_safe_method, tool)
from tests.servers import WorkerServer
from tests.thread_safety_corpus import adapters as corpus_adapters

ADAPTERS = "tests.thread_safety_corpus.adapters"


class Worker(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self, barrier=None):
        super().__init__()
        self.barrier = barrier

    @thread_safe_method
    def wait_at_barrier(self):
        self.barrier.wait(5)
        return threading.current_thread().name

    @thread_safe_method
    def nap(self, seconds):
        time.sleep(seconds)

    @thread_safe_method
    def boom(self):
        raise ValueError("boom")

    @thread_safe_method
    def outer(self):
        return self.inner()

    @thread_safe_method
    def inner(self):
        return "inner"


def test_tool_imported_from_base_adapter_threaded_marks_a_served_tool():
    # The guide imports `tool` from snakepit_bridge.base_adapter_threaded: it must mark tools that the
    # server discovers, with the description and parameters, composed with @thread_safe_method.
    class Guided(ThreadSafeAdapter):
        __thread_safe__ = True

        @thread_safe_method
        @tool(description="double it")
        def double(self, x: int) -> int:
            return 2 * x

        def helper(self) -> None:
            """Not a tool."""

    specs = Guided.tool_specs()
    assert set(specs) == {"double"}
    assert specs["double"].description == "double it"
    assert [(p.name, p.type_name, p.required) for p in specs["double"].parameters] == [("x", "int", True)]
    assert Guided().double(x=4) == 8


def test_the_base_class_does_not_declare_thread_safety_for_its_subclasses():
    class Forgot(ThreadSafeAdapter):
        pass

    class Declared(ThreadSafeAdapter):
        __thread_safe__ = True

    assert not is_declared_thread_safe(ThreadSafeAdapter)
    assert not is_declared_thread_safe(Forgot)
    assert is_declared_thread_safe(Declared)


def test_declaration_gate_names_the_class_and_the_fix(caplog):
    with pytest.raises(UnsafeAdapterError) as info:
        require_thread_safe_declaration(corpus_adapters.Undeclared)
    text = str(info.value)
    assert "tests.thread_safety_corpus.adapters.Undeclared" in text
    assert "__thread_safe__ = True" in text and "--allow-unsafe-adapter" in text
    with caplog.at_level(logging.WARNING):
        assert require_thread_safe_declaration(corpus_adapters.Undeclared, allow_unsafe=True) is False
    assert "does not declare thread safety" in caplog.text


# -- the lock ----------------------------------------------------------------------------------

def test_acquire_lock_is_reentrant():
    adapter = Worker()
    with adapter.acquire_lock():
        with adapter.acquire_lock(timeout=0.1):
            pass


def test_acquire_lock_times_out_with_a_clear_error_and_skips_the_block():
    adapter = Worker()
    held, release = threading.Event(), threading.Event()

    def holder():
        with adapter.acquire_lock():
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder, name="holder-thread")
    t.start()
    held.wait(5)
    ran = []
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            with adapter.acquire_lock(timeout=0.05):
                ran.append(True)
        assert time.monotonic() - started >= 0.05
    finally:
        release.set()
        t.join()
    assert ran == []
    assert "holder-thread" in str(info.value) and "0.05" in str(info.value)
    with adapter.acquire_lock(timeout=1):   # free again
        ran.append(True)
    assert ran == [True]


def test_acquire_lock_rejects_a_negative_timeout():
    with pytest.raises(ValueError):
        Worker().acquire_lock(timeout=-1)


def test_acquire_lock_serialises_its_blocks():
    adapter = Worker()
    inside, peak = [0], [0]

    def work():
        for _ in range(50):
            with adapter.acquire_lock():
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                time.sleep(0)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert peak[0] == 1


# -- thread-local state ------------------------------------------------------------------------

def test_thread_local_values_are_isolated_between_threads():
    adapter = Worker()
    adapter.set_thread_local("k", "main")
    seen = {}

    def other(name):
        seen[name + "-before"] = adapter.get_thread_local("k", "unset")
        adapter.set_thread_local("k", name)
        seen[name] = adapter.get_thread_local("k")

    threads = [threading.Thread(target=other, args=(f"t{i}",)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == {"t0-before": "unset", "t0": "t0", "t1-before": "unset", "t1": "t1",
                    "t2-before": "unset", "t2": "t2"}
    assert adapter.get_thread_local("k") == "main"


def test_thread_local_values_survive_across_calls_on_one_pool_thread():
    adapter = Worker()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(adapter.set_thread_local, "cache", {"a": 1}).result()
        assert pool.submit(adapter.get_thread_local, "cache").result() == {"a": 1}
        pool.submit(adapter.clear_thread_local, "cache").result()
        assert pool.submit(adapter.get_thread_local, "cache", "gone").result() == "gone"
        pool.submit(adapter.set_thread_local, "a", 1).result()
        pool.submit(adapter.set_thread_local, "b", 2).result()
        pool.submit(adapter.clear_thread_local).result()
        assert pool.submit(lambda: (adapter.get_thread_local("a"), adapter.get_thread_local("b"))).result() \
            == (None, None)


def test_get_thread_local_does_not_store_the_default():
    adapter = Worker()
    adapter.get_thread_local("x", {})
    assert adapter.get_thread_local("x") is None


# -- call tracking -----------------------------------------------------------------------------

def test_stats_count_total_active_per_thread_peak_errors_and_latency():
    adapter = Worker(threading.Barrier(3))
    threads = [threading.Thread(target=adapter.wait_at_barrier, name=f"pool-{i}") for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    adapter.nap(0.02)
    with pytest.raises(ValueError):
        adapter.boom()
    stats = adapter.get_stats()
    assert stats["total_requests"] == 5
    assert stats["active_requests"] == 0
    assert stats["peak_concurrency"] == 3
    assert stats["errors"] == 1
    assert stats["max_workers"] is None
    for name in ("pool-0", "pool-1", "pool-2"):
        assert stats["thread_utilization"][name]["requests"] == 1
        assert stats["thread_utilization"][name]["busy_seconds"] >= 0
    main = threading.current_thread().name
    assert stats["thread_utilization"][main]["requests"] == 2
    assert stats["thread_utilization"][main]["busy_seconds"] >= 0.02
    methods = stats["methods"]
    assert methods["wait_at_barrier"]["calls"] == 3 and methods["wait_at_barrier"]["peak_concurrency"] == 3
    assert methods["nap"]["mean_ms"] >= 20 and methods["nap"]["max_ms"] >= 20
    assert methods["boom"] == {**methods["boom"], "calls": 1, "errors": 1}
    json.dumps(stats)


def test_active_requests_counts_calls_in_progress():
    adapter = Worker()
    entered, leave = threading.Event(), threading.Event()

    class Slow(Worker):
        @thread_safe_method
        def slow(self):
            entered.set()
            leave.wait(5)

    slow = Slow()
    t = threading.Thread(target=slow.slow)
    t.start()
    entered.wait(5)
    try:
        assert slow.get_stats()["active_requests"] == 1
        assert slow.get_stats()["methods"]["slow"]["active"] == 1
    finally:
        leave.set()
        t.join()
    assert slow.get_stats()["active_requests"] == 0
    assert adapter.get_stats()["total_requests"] == 0


def test_nested_tracked_calls_are_one_request():
    adapter = Worker()
    assert adapter.outer() == "inner"
    stats = adapter.get_stats()
    assert stats["total_requests"] == 1
    assert stats["methods"]["outer"]["calls"] == 1 and stats["methods"]["inner"]["calls"] == 1


def test_max_workers_comes_from_the_server_binding():
    adapter = Worker()
    adapter.bind_server(SimpleNamespace(max_workers=16, worker_mode="threaded"))
    stats = adapter.get_stats()
    assert stats["max_workers"] == 16 and stats["worker_mode"] == "threaded"


def test_decorator_order_with_tool_does_not_matter():
    specs = discover_tools(corpus_adapters.DecoratorOrders)
    assert set(specs) == {"outer", "inner", "countdown", "countup"}
    assert [p.name for p in specs["outer"].parameters] == ["a", "b"]
    assert [p.name for p in specs["inner"].parameters] == ["text"]
    assert specs["outer"].description == "tracked, tool inside"
    assert specs["inner"].description == "tracked, tool outside"
    assert specs["countdown"].streaming and specs["countup"].streaming
    assert not specs["outer"].streaming
    for name in specs:
        method = getattr(corpus_adapters.DecoratorOrders, name)
        assert method.__snakepit_thread_safe__ is True
        assert inspect.unwrap(method) is not method
    adapter = corpus_adapters.DecoratorOrders()
    assert list(adapter.countdown(3)) == [3, 2, 1]
    assert adapter.get_stats()["methods"]["countdown"]["calls"] == 1


def test_a_method_on_a_class_that_is_not_a_thread_safe_adapter_is_still_counted():
    class Other:
        @thread_safe_method
        def f(self):
            return 1

    o = Other()
    assert o.f() == 1 and o.f() == 1
    assert o._sp_stats.snapshot()["total_requests"] == 2


class RecordingHooks:
    """A CheckerHooks that writes down what it is told."""

    def __init__(self):
        self.events = []

    def adapter_created(self, adapter):
        self.events.append(("created", type(adapter).__name__))

    def method_entered(self, adapter, name):
        self.events.append(("entered", name))
        return name

    def method_exited(self, entry):
        self.events.append(("exited", entry))

    def lock_acquired(self, lock):
        self.events.append(("acquired", lock))

    def lock_released(self, lock):
        self.events.append(("released", lock))


def test_the_adapter_side_tells_the_active_checker_only_through_checker_hooks(monkeypatch):
    from snakepit_bridge.threadsafety import hooks
    from snakepit_bridge.threadsafety.checker import active

    class Hooked(ThreadSafeAdapter):
        __thread_safe__ = True

        @thread_safe_method
        def locked(self):
            with self.acquire_lock():
                return "done"

        @thread_safe_method
        def steps(self):
            yield 1

    recorder = RecordingHooks()
    monkeypatch.setattr(active, "current", recorder)
    assert hooks.get_active_checker() is recorder
    adapter = Hooked()
    assert adapter.locked() == "done"
    assert list(adapter.steps()) == [1]
    lock = adapter._sp_lock
    assert recorder.events == [("created", "Hooked"), ("entered", "locked"), ("acquired", lock),
                               ("released", lock), ("exited", "locked"), ("entered", "steps"),
                               ("exited", "steps")]


def test_the_adapter_module_imports_the_checker_hooks_not_the_checker():
    import ast

    import snakepit_bridge.threadsafety.adapter as module

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(module)))
                if isinstance(node, ast.ImportFrom)}
    assert "hooks" in imported and not any(m and m.startswith("checker") for m in imported)


# -- through the real servers -------------------------------------------------------------------

def test_threaded_server_refuses_an_undeclared_adapter_naming_class_and_fix():
    server = WorkerServer("threaded", "--adapter", f"{ADAPTERS}.Undeclared", startup_timeout=30)
    with pytest.raises(Exception) as info:
        server.start()
    server.kill()
    assert server.process.returncode == 1
    text = str(info.value)
    assert "Undeclared" in text and "__thread_safe__ = True" in text and "--allow-unsafe-adapter" in text


def test_allow_unsafe_adapter_serves_it_with_a_warning_and_the_checker_reports_it(tmp_path):
    report = tmp_path / "r.json"
    with WorkerServer("threaded", "--adapter", f"{ADAPTERS}.PlainUndeclared", "--allow-unsafe-adapter",
                      "--thread-safety-check", "--thread-safety-report", str(report)) as server:
        assert server.client().execute("hello") == "hello"
        server.terminate()
    assert any("__thread_safe__" in line and "WARNING" in line for line in server.stderr_lines)
    findings = json.loads(report.read_text())["findings"]
    assert [f["kind"] for f in findings] == ["undeclared_thread_safety"]
    message = findings[0]["message"]   # the one undeclared-adapter message, as the gate's warning
    assert message.startswith("Adapter PlainUndeclared does not declare thread safety. ")
    assert "__thread_safe__ = True" in message and "--allow-unsafe-adapter" in message
    assert any(message in line and "WARNING" in line for line in server.stderr_lines)


def test_process_server_accepts_any_adapter():
    with WorkerServer("process", "--adapter", f"{ADAPTERS}.PlainUndeclared") as server:
        assert server.client().execute("hello") == "hello"


def test_both_decorator_orders_work_through_the_threaded_server():
    with WorkerServer("threaded", "--adapter", f"{ADAPTERS}.DecoratorOrders", "--max-workers", "4") as server:
        client = server.client()
        described = {t.name: t for t in client.describe_tools().tools}
        assert {"outer", "inner", "countdown", "countup"} <= set(described)
        assert [p.name for p in described["outer"].parameters] == ["a", "b"]
        assert described["countdown"].supports_streaming and not described["inner"].supports_streaming
        assert client.execute("outer", {"a": 3}) == 6
        assert client.execute("inner", {"text": "hi"}) == "HI"
        assert list(client.stream("countdown", {"n": 3})) == [3, 2, 1]
        assert list(client.stream("countup", {"n": 2})) == [0, 1]
        stats = json.loads(client.stats().adapter_stats_json)
    assert {m: stats["methods"][m]["calls"] for m in ("outer", "inner", "countdown", "countup")} == \
        {"outer": 1, "inner": 1, "countdown": 1, "countup": 1}
    assert stats["max_workers"] == 4 and stats["worker_mode"] == "threaded"


def test_thread_local_state_persists_per_pool_thread_through_the_server():
    with WorkerServer("threaded", "--adapter", f"{ADAPTERS}.ThreadLocalCounter", "--max-workers", "4") as server:
        client = server.client()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: client.execute("served_by_this_thread", {"hold": 0.005}), range(60)))
    by_thread = {}
    for reply in replies:
        by_thread.setdefault(reply["thread"], []).append(reply["served"])
    assert len(by_thread) >= 2
    for counts in by_thread.values():   # each thread saw exactly its own earlier requests
        assert sorted(counts) == list(range(1, len(counts) + 1))


def test_get_thread_stats_tool_has_the_guides_shape():
    with WorkerServer("threaded", "--max-workers", "16") as server:   # default adapter: ThreadedShowcaseAdapter
        client = server.client()
        result = client.execute("compute_intensive", {"data": [1, 2, 3]})
        assert result["input_size"] == 3
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: client.execute("predict", {"input_data": f"in{i % 3}"}), range(20)))
        stats = client.execute("get_thread_stats", {})
    assert stats["total_requests"] == 22     # compute_intensive, 20 predict, get_thread_stats itself
    assert stats["active_requests"] == 1     # this very call
    assert stats["max_workers"] == 16
    assert sum(t["requests"] for t in stats["thread_utilization"].values()) == 21
    assert all(name.startswith("ThreadPoolExecutor-0_") for name in stats["thread_utilization"])
    assert stats["total_predictions"] == 20


def test_torch_tool_without_torch_fails_with_a_clear_error():
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed here")
    except ImportError:
        pass
    from snakepit_bridge.client import BridgeCallError

    with WorkerServer("threaded") as server:
        with pytest.raises(BridgeCallError) as info:
            server.client().execute("torch_inference", {"input_tensor": [0.0] * 16})
    assert "TorchUnavailableError" in str(info.value) and "PyTorch" in str(info.value)


def test_torch_tool_with_torch_builds_one_shared_model_and_serves_threads():
    pytest.importorskip("torch")
    from snakepit_bridge.adapters.threaded_showcase import ThreadedShowcaseAdapter

    adapter = ThreadedShowcaseAdapter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: adapter.torch_inference([[float(i)] * 16]), range(12)))
    assert all(len(o["output"]) == 1 and len(o["output"][0]) == 4 for o in outs)
    assert outs[3]["output"] == adapter.torch_inference([[3.0] * 16])["output"]
    model = adapter._torch_model
    adapter.torch_inference([0.0] * 16)
    assert adapter._torch_model is model
