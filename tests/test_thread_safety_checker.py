"""ThreadSafetyChecker: finds races (lockset), unsafe libraries and undeclared adapters.

Unit tests drive adapters with plain threads; the corpus tests serve each adapter of
tests/thread_safety_corpus with the real threaded server and many concurrent gRPC clients.
"""
from __future__ import annotations

import inspect
import json
import linecache
import logging
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from snakepit_bridge import thread_safety_checker as tsc
from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method
from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker, ThreadSafetyViolation
from tests.thread_safety_corpus import racy, safe
from tests.thread_safety_corpus.harness import exercise

pytestmark = pytest.mark.usefixtures("fast_switching")


def run_threads(target, n=4, *args):
    threads = [threading.Thread(target=target, args=args, name=f"worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def races(report):
    return {f["attribute"]: f for f in report["findings"] if f["kind"] == "unprotected_shared_state"}


class Counter(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self):
        super().__init__()
        self.counter = 0
        self.locked = 0
        self.results = []
        self.cache = {}
        self.tags = set()
        self.config = {"scale": 2}

    @thread_safe_method
    def unlocked_increment(self):
        self.counter += 1

    @thread_safe_method
    def locked_increment(self):
        with self.acquire_lock():
            self.locked += 1

    @thread_safe_method
    def unlocked_set_locked(self):
        self.locked = 0

    @thread_safe_method
    def append(self, x):
        self.results.append(x)

    @thread_safe_method
    def put(self, k):
        if k not in self.cache:
            self.cache[k] = k

    @thread_safe_method
    def tag(self, x):
        self.tags.add(x)

    @thread_safe_method
    def read_config(self):
        return self.config["scale"]

    @thread_safe_method
    def thread_local_count(self):
        n = self.get_thread_local("n", 0) + 1
        self.set_thread_local("n", n)
        return n


# -- lockset: what is and is not a race ---------------------------------------------------------

def test_unlocked_read_modify_write_by_two_threads_is_reported_with_attribute_threads_and_lines(checker):
    adapter = Counter()
    run_threads(lambda: [adapter.unlocked_increment() for _ in range(50)])
    found = races(checker.get_report())
    assert set(found) == {"counter"}
    finding = found["counter"]
    assert finding["methods"] == ["unlocked_increment"]
    assert len(set(finding["threads"])) >= 2
    assert finding["message"].startswith("THREAD SAFETY: ")
    for access in finding["conflict"]:
        assert access["locks_held"] == []
        assert "self.counter += 1" in linecache.getline(access["file"], access["line"])
    assert {a["access"] for a in finding["accesses"]} == {"read", "write"}


def test_state_guarded_by_the_adapter_lock_everywhere_is_not_reported(checker):
    adapter = Counter()
    run_threads(lambda: [adapter.locked_increment() for _ in range(50)])
    assert races(checker.get_report()) == {}
    assert adapter.locked == 200


def test_a_writer_without_the_lock_breaks_the_lock_discipline(checker):
    adapter = Counter()

    def work():
        for _ in range(20):
            adapter.locked_increment()
            adapter.unlocked_set_locked()

    run_threads(work, 2)
    finding = races(checker.get_report())["locked"]
    assert set(finding["methods"]) == {"locked_increment", "unlocked_set_locked"}
    held = [a["locks_held"] for a in finding["conflict"]]
    assert [] in held


@pytest.mark.parametrize("method, attribute", [("append", "results"), ("put", "cache"), ("tag", "tags")])
def test_in_place_change_of_a_container_attribute_is_a_write(checker, method, attribute):
    adapter = Counter()
    run_threads(lambda: [getattr(adapter, method)(i % 5) for i in range(40)])
    found = races(checker.get_report())
    assert set(found) == {attribute}
    # The change is a write of the container's contents or of one element (which of the two
    # conflicts is reported first depends on how the threads interleaved), never of the binding.
    accesses = found[attribute]["accesses"]
    assert any(a["what"] in ("contents", "element") and a["access"] == "write" for a in accesses), accesses
    assert not any(a["what"] == "attribute" and a["access"] == "write" for a in accesses)


def test_state_set_before_serving_and_only_read_afterwards_is_not_a_race(checker):
    adapter = Counter()
    adapter.config["scale"] = 3          # still the creating thread, before serving
    run_threads(lambda: [adapter.read_config() for _ in range(50)])
    assert checker.get_report()["findings"] == []


def test_thread_local_state_is_not_a_race(checker):
    adapter = Counter()
    seen = []
    run_threads(lambda: seen.append([adapter.thread_local_count() for _ in range(10)][-1]))
    assert seen == [10, 10, 10, 10]
    assert checker.get_report()["findings"] == []


def test_a_lock_held_in_an_attribute_counts_as_held(checker):
    class OwnLock(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self._guard = threading.Lock()
            self.value = 0

        @thread_safe_method
        def bump(self):
            with self._guard:
                self.value += 1

    adapter = OwnLock()
    run_threads(lambda: [adapter.bump() for _ in range(50)])
    assert checker.get_report()["findings"] == []
    assert adapter.value == 200


def test_a_plain_base_adapter_can_be_attached_explicitly(checker):
    from snakepit_bridge.adapter import BaseAdapter

    class Plain(BaseAdapter):
        def __init__(self):
            super().__init__()
            self.hits = 0

        def hit(self):
            self.hits += 1

    adapter = Plain()
    checker.attach(adapter)
    run_threads(lambda: [adapter.hit() for _ in range(30)])
    assert set(races(checker.get_report())) == {"hits"}
    assert isinstance(adapter, Plain) and type(adapter).__name__ == "Plain"


def test_aliased_containers_keep_their_identity(checker):
    class Aliased(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            shared = []
            self.a = shared
            self.b = shared

    adapter = Aliased()
    checker.attach(adapter)
    adapter.a.append(1)
    assert adapter.a is adapter.b and adapter.b == [1]


def test_each_finding_is_logged_once_with_the_guide_prefix(checker, caplog):
    adapter = Counter()
    with caplog.at_level(logging.WARNING, logger="snakepit_bridge.thread_safety"):
        for _ in range(3):
            run_threads(lambda: [adapter.unlocked_increment() for _ in range(20)])
    lines = [r.getMessage() for r in caplog.records if "'counter'" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("⚠️  THREAD SAFETY: Unprotected shared state")


# -- overlap: concurrency is threads inside at the same time ------------------------------------

class Overlap(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self, barrier=None):
        super().__init__()
        self.barrier = barrier

    @thread_safe_method
    def work(self):
        if self.barrier is not None:
            self.barrier.wait(5)


def test_different_threads_one_after_another_are_not_concurrent(checker):
    adapter = Overlap()
    for i in range(3):
        t = threading.Thread(target=adapter.work, name=f"seq-{i}")
        t.start()
        t.join()
    rec = checker.get_report()["methods"]["Overlap.work"]
    assert rec["threads_seen"] == 3
    assert rec["peak_concurrent_threads"] == 1 and rec["concurrent"] is False


def test_threads_inside_a_method_at_the_same_time_are_concurrent(checker, caplog):
    adapter = Overlap(threading.Barrier(3))
    with caplog.at_level(logging.INFO, logger="snakepit_bridge.thread_safety"):
        run_threads(adapter.work, 3)
    assert [r.getMessage() for r in caplog.records] == [
        "⚠️  THREAD SAFETY: Method 'work' accessed by 2 different threads concurrently."]
    report = checker.get_report()
    assert report["methods"]["Overlap.work"]["peak_concurrent_threads"] == 3
    assert report["concurrent_methods"] == ["Overlap.work"]


# -- strict mode --------------------------------------------------------------------------------

def test_strict_mode_raises_in_the_offending_call_only():
    checker = ThreadSafetyChecker(enabled=True, strict_mode=True)
    try:
        adapter = Counter()
        outcomes = []

        def work():
            for _ in range(20):
                try:
                    adapter.unlocked_increment()
                    outcomes.append("ok")
                except ThreadSafetyViolation as exc:
                    outcomes.append(str(exc))

        run_threads(work, 4)
        failures = [o for o in outcomes if o != "ok"]
        assert len(failures) == 1
        assert "THREAD SAFETY: Unprotected shared state: attribute 'counter'" in failures[0]
        assert outcomes.count("ok") == 79
        assert checker.get_report()["findings"][0]["severity"] == "error"
    finally:
        checker.close()


# -- unsafe libraries ---------------------------------------------------------------------------

class SqliteUser(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self, lock_it):
        super().__init__()
        self.lock_it = lock_it
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.conn.execute("CREATE TABLE t (v INTEGER)")

    @thread_safe_method
    def insert(self):
        if self.lock_it:
            with self.acquire_lock():
                self.conn.execute("INSERT INTO t VALUES (1)")
        else:
            self.conn.execute("INSERT INTO t VALUES (1)")


@pytest.mark.parametrize("lock_it", [False, True])
def test_a_sqlite_connection_shared_by_threads_is_reported_unless_locked(checker, lock_it):
    adapter = SqliteUser(lock_it)
    run_threads(lambda: [adapter.insert() for _ in range(10)])
    libs = [f for f in checker.get_report()["findings"] if f["kind"] == "unsafe_library"]
    if lock_it:
        assert libs == []
    else:
        assert len(libs) == 1
        assert libs[0]["library"] == "sqlite3" and libs[0]["tool"] == "insert"
        assert "Unsafe library 'sqlite3' detected" in libs[0]["message"]
        assert "connection per thread" in libs[0]["message"].lower()


def test_importing_an_unsafe_library_is_not_using_it(checker):
    pd = pytest.importorskip("pandas")

    class Imports(ThreadSafeAdapter):
        __thread_safe__ = True

        @thread_safe_method
        def noop(self):
            return pd is not None

    adapter = Imports()
    run_threads(lambda: [adapter.noop() for _ in range(10)])
    assert checker.get_report()["findings"] == []


@pytest.mark.parametrize("lock_it", [False, True])
def test_pandas_used_from_several_threads_is_reported_unless_locked(checker, lock_it):
    pd = pytest.importorskip("pandas")

    class Frames(ThreadSafeAdapter):
        __thread_safe__ = True

        @thread_safe_method
        def summarise(self, data):
            if lock_it:
                with self.acquire_lock():
                    return pd.DataFrame(data).groupby("k").sum()
            return pd.DataFrame(data).groupby("k").sum()

    adapter = Frames()
    run_threads(lambda: [adapter.summarise({"k": [1, 2, 1], "v": [1, 2, 3]}) for _ in range(5)])
    libs = [f for f in checker.get_report()["findings"] if f["kind"] == "unsafe_library"]
    assert [(f["library"], f["tool"]) for f in libs] == ([] if lock_it else [("pandas", "summarise")])


# -- declaration, report, life cycle ------------------------------------------------------------

def test_an_adapter_without_the_declaration_gets_the_guide_warning(checker, caplog):
    class MyAdapter(ThreadSafeAdapter):
        pass

    with caplog.at_level(logging.WARNING, logger="snakepit_bridge.thread_safety"):
        assert checker.check_declaration(MyAdapter) is False
        assert checker.check_declaration(Counter) is True
    [logged] = [r.getMessage() for r in caplog.records]
    assert logged.startswith("⚠️  Adapter MyAdapter does not declare thread safety. ")
    finding = checker.get_report()["findings"][0]
    assert finding["kind"] == "undeclared_thread_safety"
    assert logged == f"⚠️  {finding['message']}" and "--allow-unsafe-adapter" in finding["message"]
    assert "__thread_safe__ = True" in finding["advice"]


def test_the_report_is_json_and_tells_whether_the_gil_is_enabled(checker, tmp_path):
    adapter = Counter()
    run_threads(lambda: [adapter.unlocked_increment() for _ in range(10)])
    path = checker.write_report(str(tmp_path / "r.json"))
    report = json.loads(Path(path).read_text())
    probe = getattr(sys, "_is_gil_enabled", None)
    assert report["gil_enabled"] == (True if probe is None else probe())
    assert report["python_version"] == sys.version.split()[0]
    assert report["summary"]["by_kind"] == {"unprotected_shared_state": 1}


def test_creating_an_enabled_checker_makes_it_active_and_close_stops_it():
    first = ThreadSafetyChecker(enabled=True)
    assert tsc.get_active_checker() is first
    disabled = ThreadSafetyChecker(enabled=False)
    assert tsc.get_active_checker() is first
    first.close()
    assert tsc.get_active_checker() is None
    assert disabled.get_report()["enabled"] is False


def test_detach_restores_the_class_and_stops_recording(checker):
    adapter = Counter()
    adapter.unlocked_increment()
    assert type(adapter) is not Counter
    checker.detach(adapter)
    assert type(adapter) is Counter
    run_threads(lambda: [adapter.unlocked_increment() for _ in range(10)])
    assert races(checker.get_report()) == {}


# -- the corpus, through the real threaded server -----------------------------------------------

def corpus(module):
    return [pytest.param(cls, id=name) for name, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__]


def needs(cls):
    lib = getattr(cls, "NEEDS", None)
    if lib:
        pytest.importorskip(lib)


@pytest.mark.parametrize("cls", corpus(racy))
def test_server_checker_flags_racy_corpus_adapter(cls):
    needs(cls)
    run = exercise(f"{cls.__module__}.{cls.__name__}", cls.CALLS)
    assert run.exit_code == 0   # a race may break some calls (SharedDataFrame does), never the server
    kind, name = cls.EXPECT
    findings = run.findings(kind)
    assert len(findings) >= 1, run.report
    key = "attribute" if kind == "unprotected_shared_state" else "library"
    assert {f[key] for f in findings} == {name}
    assert run.findings("undeclared_thread_safety") == []
    other = [f for f in run.report["findings"] if f["kind"] != kind]
    assert other == []
    finding = findings[0]
    assert len(set(finding["threads"])) >= 2
    assert finding["message"].startswith("THREAD SAFETY: ")
    tools = {t for t, _ in cls.CALLS}
    assert set(finding.get("methods") or finding.get("tools")) <= tools | {"_remember"}
    source = Path(inspect.getsourcefile(cls)).resolve()
    in_corpus = [a for a in finding["accesses"] if Path(a["file"]).resolve() == source]
    assert in_corpus, finding["accesses"]
    if kind == "unprotected_shared_state":
        assert all(name in linecache.getline(a["file"], a["line"]) for a in in_corpus)
    # the same finding is in GetStats while serving, and was logged exactly once
    assert finding["message"] in [f["message"] for f in run.live_report["findings"]]
    assert sum(finding["message"] in line for line in run.stderr) == 1


@pytest.mark.parametrize("cls", corpus(safe))
def test_server_checker_does_not_flag_correct_corpus_adapter(cls):
    needs(cls)
    run = exercise(f"{cls.__module__}.{cls.__name__}", cls.CALLS)
    assert run.exit_code == 0 and run.errors == []
    assert run.report["findings"] == [], json.dumps(run.report["findings"], indent=1)[:3000]
    assert run.live_report["findings"] == []
    assert len(run.results) == 12 * len(cls.CALLS)


def test_server_checker_passes_the_threaded_showcase_adapter():
    run = exercise("snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter",
                   [("predict", {"input_data": "a"}), ("predict", {"input_data": "b"}),
                    ("cached_compute", {"key": "k"}), ("compute_intensive", {"data": [1, 2, 3], "size": 32}),
                    ("matrix_multiply", {"data": [1.0] * 16}), ("recent_predictions", {"limit": 3}),
                    ("get_thread_stats", {})])
    assert run.errors == []
    assert run.report["findings"] == []
    assert run.adapter_stats["total_predictions"] == 24


def test_server_strict_mode_fails_only_the_offending_call_and_keeps_serving():
    cls = racy.UnlockedCounter
    run = exercise(f"{cls.__module__}.{cls.__name__}", cls.CALLS, extra_args=("--thread-safety-strict",))
    assert len(run.errors) == 1
    error = run.errors[0]
    assert "ThreadSafetyViolation" in str(error)
    assert "THREAD SAFETY: Unprotected shared state: attribute 'counter'" in str(error)
    assert len(run.results) == 12 * len(cls.CALLS) - 1
    assert run.exit_code == 0
    assert run.report["strict_mode"] is True


def test_server_overlap_counts_simultaneous_callers_not_distinct_threads():
    cls = safe.ReadOnlySharedModel
    path = f"{cls.__module__}.{cls.__name__}"
    sequential = exercise(path, [("label", {"index": 1})], clients=1, rounds=30)
    rec = sequential.report["methods"]["ReadOnlySharedModel.label"]
    assert rec["calls"] == 30 and rec["peak_concurrent_threads"] == 1 and rec["concurrent"] is False
    parallel = exercise(path, [("predict", {"values": [1.0, 2.0, 3.0, 4.0]})], clients=8, rounds=40)
    rec = parallel.report["methods"]["ReadOnlySharedModel.predict"]
    assert rec["peak_concurrent_threads"] >= 2 and rec["concurrent"] is True


def test_attributes_named_in_thread_safety_ignore_are_not_tracked(checker):
    class Benign(ThreadSafeAdapter):
        __thread_safe__ = True
        __thread_safety_ignore__ = ("last_seen",)

        def __init__(self):
            super().__init__()
            self.last_seen = None
            self.hits = 0

        @thread_safe_method
        def touch(self, x):
            self.last_seen = x          # deliberately racy, last writer wins
            self.hits += 1

    adapter = Benign()
    run_threads(lambda: [adapter.touch(i) for i in range(20)])
    assert set(races(checker.get_report())) == {"hits"}


def test_the_flagged_counter_really_loses_updates_and_the_locked_one_does_not():
    """What the checker reports is a real bug: with calls overlapping (setswitchinterval and a
    pause between read and write), the unlocked counter loses increments, the locked one never."""
    racy_run = exercise(f"{racy.__name__}.UnlockedCounter", [("increment", {})], rounds=64)
    assert len(racy_run.results) == 64
    assert max(racy_run.results) < 64
    safe_run = exercise(f"{safe.__name__}.LockedCounter", [("increment", {})], rounds=64)
    assert sorted(safe_run.results) == list(range(1, 65))
