"""ThreadSafetyChecker, second generation: happens-before on top of the lockset, dicts per key and
lists per index, containers inside containers, numpy arrays and bytearrays, one-time publication.

The corpus tests serve each adapter of tests/thread_safety_corpus/{racy,safe}_gen2.py with the real
threaded server and many concurrent gRPC clients, and check the adapter's invariant afterwards: each
racy one is flagged *and* lost or duplicated updates, each correct one is not flagged and kept it.
The unit tests drive small adapters with plain threads.
"""
from __future__ import annotations

import collections
import concurrent.futures
import inspect
import linecache
import queue
import threading

import numpy as np
import pytest

from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method
from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker, ThreadSafetyViolation
from snakepit_bridge.threadsafety.checker import containers, syncpoints
from tests.thread_safety_corpus import racy_gen2, safe_gen2
from tests.thread_safety_corpus.harness import exercise

pytestmark = pytest.mark.usefixtures("fast_switching")


def run_threads(target, n=4):
    threads = [threading.Thread(target=target, args=(i,), name=f"worker-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def races(checker):
    return {f["attribute"]: f for f in checker.get_report()["findings"]
            if f["kind"] == "unprotected_shared_state"}


# -- the corpus, through the real threaded server -----------------------------------------------

def corpus(module):
    return [pytest.param(cls, id=name) for name, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__]


ROUNDS = 16


def rounds(cls) -> int:
    return getattr(cls, "ROUNDS", ROUNDS)


def calls_made(cls) -> dict:
    return dict(collections.Counter(tool for tool, _ in cls.CALLS * rounds(cls)))


@pytest.mark.parametrize("cls", corpus(racy_gen2))
def test_server_checker_flags_racy_gen2_adapter_that_really_loses_updates(cls):
    run = exercise(f"{cls.__module__}.{cls.__name__}", cls.CALLS, rounds=rounds(cls), final=cls.FINAL)
    assert run.exit_code == 0 and run.errors == []
    assert not cls.invariant(run.final, calls_made(cls), run.results), f"no update was lost: {run.final}"
    kind, name = cls.EXPECT
    findings = run.findings(kind)
    assert {f["attribute"] for f in findings} == {name}, run.report["findings"]
    assert [f for f in run.report["findings"] if f["kind"] != kind] == []
    finding = findings[0]
    # why: both accesses with their stacks (file:line), the locks held, no happens-before edge
    assert "no happens-before edge" in finding["message"]
    assert finding["ordered"] is False and finding["why"]["locks_in_common"] == []
    source = inspect.getsourcefile(cls)
    for access, stack in zip(finding["conflict"], finding["why"]["stacks"]):
        assert access["thread"] and isinstance(access["locks_held"], list)
        assert stack and stack == access["stack"]
        assert access["file"] == source and access["element"].startswith(f"self.{name}")
        if access["what"] == "attribute":
            assert name in linecache.getline(access["file"], access["line"])
    assert finding["conflict"][0]["thread"] != finding["conflict"][1]["thread"]
    assert sum(finding["message"] in line for line in run.stderr) == 1


@pytest.mark.parametrize("cls", corpus(safe_gen2))
def test_server_checker_does_not_flag_correct_gen2_adapter_and_it_keeps_its_invariant(cls):
    run = exercise(f"{cls.__module__}.{cls.__name__}", cls.CALLS, rounds=rounds(cls), final=cls.FINAL)
    assert run.exit_code == 0 and run.errors == []
    assert run.report["findings"] == [], run.report["findings"][:2]
    assert cls.invariant(run.final, calls_made(cls), run.results), run.final
    assert len(run.results) == rounds(cls) * len(cls.CALLS)


def test_server_strict_mode_raises_in_the_racy_call_of_a_gen2_adapter():
    cls = racy_gen2.NumpyHistogramInPlace
    run = exercise(f"{cls.__module__}.{cls.__name__}", cls.CALLS, rounds=ROUNDS,
                   extra_args=("--thread-safety-strict",))
    assert len(run.errors) == 1
    assert "ThreadSafetyViolation" in str(run.errors[0]) and "'bins'" in str(run.errors[0])
    assert len(run.results) == rounds(cls) * len(cls.CALLS) - 1


# -- happens-before: hand-offs order accesses that share no lock --------------------------------

class Shared(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self):
        super().__init__()
        self.value = 0
        self.items = []


def test_a_queue_hand_off_orders_the_producer_before_the_consumer(checker):
    adapter = Shared()
    q: queue.Queue = queue.Queue()

    def producer():
        for i in range(20):
            adapter.value = i
            adapter.items.append(i)
            q.put(i)

    def consumer():
        for _ in range(20):
            q.get()
        assert adapter.value == 19 and len(adapter.items) == 20

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert races(checker) == {}


def test_a_hand_off_made_by_the_server_or_grpc_is_not_an_edge(checker):
    adapter = Shared()
    q: queue.Queue = queue.Queue()
    as_grpc = {"__name__": "grpc._server", "q": q}    # code whose module is gRPC's

    def producer():
        adapter.value = 1
        exec("q.put(1)", as_grpc)

    def consumer():
        exec("q.get()", as_grpc)
        return adapter.value

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(races(checker)) == {"value"}


def test_the_same_accesses_without_the_hand_off_are_a_race(checker):
    adapter = Shared()
    go = threading.Barrier(2)

    def writer(_):
        go.wait()
        adapter.value = 1

    def reader(_):
        go.wait()
        return adapter.value

    a = threading.Thread(target=writer, args=(0,))
    b = threading.Thread(target=reader, args=(1,))
    a.start()
    b.start()
    a.join()
    b.join()
    # the barrier orders what came before it, not the accesses after it
    assert set(races(checker)) == {"value"}


def test_event_set_orders_writes_before_the_waiters_reads(checker):
    adapter = Shared()
    ready = threading.Event()

    def loader():
        adapter.value = 42
        ready.set()

    def user(_):
        ready.wait(5)
        assert adapter.value == 42

    t = threading.Thread(target=loader)
    t.start()
    run_threads(user, 3)
    t.join()
    assert races(checker) == {}


def test_thread_start_and_join_order_the_parent_and_the_child(checker):
    adapter = Shared()

    def child():
        adapter.value += 1

    for _ in range(3):
        t = threading.Thread(target=child)
        adapter.value += 1           # before start: ordered before the child
        t.start()
        t.join()                     # the child's write is ordered before what follows
    assert adapter.value == 6
    assert races(checker) == {}


def test_barrier_phases_order_each_phase_before_the_next(checker):
    adapter = Shared()
    adapter.items.extend([0, 0, 0])
    barrier = threading.Barrier(3)

    def work(i):
        adapter.items[i] = i          # phase 1: each its own slot
        barrier.wait()
        if i == 0:
            adapter.value = sum(list(adapter.items))   # phase 2: one thread reads them all

    run_threads(work, 3)
    assert adapter.value == 3
    assert races(checker) == {}


def test_condition_notify_orders_the_notifier_before_the_woken_waiter(checker):
    adapter = Shared()
    cond = threading.Condition()
    state = {"ready": False}

    def waiter():
        with cond:
            cond.wait_for(lambda: state["ready"], 5)
        assert adapter.value == 7      # read outside the condition's lock

    t = threading.Thread(target=waiter)
    t.start()
    adapter_writer = threading.Thread(target=lambda: (setattr(adapter, "value", 7),
                                                      _notify(cond, state)))
    adapter_writer.start()
    adapter_writer.join()
    t.join()
    assert races(checker) == {}


def _notify(cond, state):
    with cond:
        state["ready"] = True
        cond.notify_all()


def test_a_semaphore_used_as_a_mutex_orders_its_holders(checker):
    adapter = Shared()
    sem = threading.Semaphore(1)

    def work(_):
        for _ in range(20):
            with sem:
                adapter.value = adapter.value + 1

    run_threads(work, 4)
    assert adapter.value == 80
    assert races(checker) == {}


def test_submit_and_result_order_the_caller_and_the_pool_thread(checker):
    adapter = Shared()

    def task():
        adapter.value += 1
        return adapter.value

    def caller(_):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for i in range(10):
                adapter.value += 0            # the caller writes, then hands off
                assert pool.submit(task).result(5) == i + 1

    run_threads(caller, 1)
    assert adapter.value == 10
    assert races(checker) == {}


def test_lock_hand_off_orders_but_a_writer_without_the_lock_still_races(checker):
    class Mixed(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self._lock = threading.Lock()
            self.total = 0

        @thread_safe_method
        def locked(self):
            with self._lock:
                v = self.total
                self.total = v + 1

        @thread_safe_method
        def unlocked(self):
            v = self.total
            self.total = v - 1

    adapter = Mixed()
    go = threading.Barrier(2)

    def a(_):
        go.wait()
        for _ in range(30):
            adapter.locked()

    def b(_):
        go.wait()
        for _ in range(30):
            adapter.unlocked()

    ta, tb = threading.Thread(target=a, args=(0,)), threading.Thread(target=b, args=(1,))
    ta.start()
    tb.start()
    ta.join()
    tb.join()
    finding = races(checker)["total"]
    assert sorted(h for acc in finding["conflict"] for h in acc["locks_held"]) == ["self._lock"]


# -- element-level tracking ---------------------------------------------------------------------

class Keyed(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self, n=4):
        super().__init__()
        self.by_key = {f"k{i}": 0 for i in range(n)}
        self.slots = [0] * n

    @thread_safe_method
    def bump_key(self, key):
        self.by_key[key] = self.by_key[key] + 1

    @thread_safe_method
    def bump_slot(self, i):
        self.slots[i] += 1


def test_reading_every_value_while_another_thread_writes_one_races(checker):
    adapter = Keyed()
    go = threading.Barrier(2)

    def writer(_):
        go.wait()
        for _ in range(30):
            adapter.bump_key("k0")
            adapter.bump_slot(0)

    def reader(_):
        go.wait()
        for _ in range(30):
            sum(adapter.by_key.values())
            sum(adapter.slots)

    a, b = threading.Thread(target=writer, args=(0,)), threading.Thread(target=reader, args=(1,))
    a.start()
    b.start()
    a.join()
    b.join()
    assert set(races(checker)) == {"by_key", "slots"}


def test_distinct_dict_keys_and_list_slots_do_not_race(checker):
    adapter = Keyed()
    run_threads(lambda i: [(adapter.bump_key(f"k{i}"), adapter.bump_slot(i)) for _ in range(30)])
    assert races(checker) == {}
    assert adapter.by_key == {f"k{i}": 30 for i in range(4)} and adapter.slots == [30] * 4


def test_colliding_dict_keys_and_list_slots_race_and_name_the_element(checker):
    adapter = Keyed()
    run_threads(lambda i: [(adapter.bump_key("k1"), adapter.bump_slot(-1)) for _ in range(30)])
    found = races(checker)
    assert set(found) == {"by_key", "slots"}
    assert found["by_key"]["element"] == "self.by_key['k1']"
    assert found["slots"]["element"] == "self.slots[3]"     # a negative index is its element


def test_new_keys_from_several_threads_do_not_race_but_iterating_meanwhile_does(checker):
    adapter = Keyed(0)

    def insert(i):
        for j in range(10):
            adapter.by_key[f"t{i}-{j}"] = j

    run_threads(insert)
    assert races(checker) == {}
    go = threading.Barrier(2)

    def insert_more(_):
        go.wait()
        for j in range(50):
            adapter.by_key[f"more-{j}"] = j

    def iterate(_):
        go.wait()
        for _ in range(50):
            len(adapter.by_key)

    a, b = threading.Thread(target=insert_more, args=(0,)), threading.Thread(target=iterate, args=(1,))
    a.start()
    b.start()
    a.join()
    b.join()
    assert set(races(checker)) == {"by_key"}


def test_past_the_bound_keys_count_as_the_whole_container(checker):
    adapter = Keyed(0)
    many = containers.MAX_TRACKED_KEYS + 10

    def fill(i):
        for j in range(many):
            adapter.by_key.get(f"{i}-{j}")
        adapter.by_key[f"late-{i}"] = i         # a new key past the bound: the whole dict

    run_threads(fill, 2)
    assert set(races(checker)) == {"by_key"}


def test_containers_inside_containers_are_followed(checker):
    class Nested(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self.table = {"rows": [], "meta": {"seen": 0}}
            self.groups = {}

        @thread_safe_method
        def add_row(self, x):
            self.table["rows"].append(x)

        @thread_safe_method
        def group(self, key, x):
            self.groups.setdefault(key, []).append(x)     # a fresh inner list, then appended to

    adapter = Nested()
    run_threads(lambda i: [adapter.add_row(i) for _ in range(10)])
    assert set(races(checker)) == {"table"}
    assert races(checker)["table"]["element"] == "self.table['rows']"
    run_threads(lambda i: [adapter.group("same", i) for _ in range(10)])
    assert races(checker)["groups"]["element"] == "self.groups['same']"


def test_nested_containers_referred_to_elsewhere_are_left_alone(checker):
    inner: list = []

    class Aliased(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self.table = {"rows": inner}

    adapter = Aliased()
    adapter.table["rows"].append(1)
    assert adapter.table["rows"] is inner and inner == [1]


# -- numpy arrays and bytearrays ----------------------------------------------------------------

class Arrays(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self):
        super().__init__()
        self.buf = np.zeros(8)
        self.raw = bytearray(8)

    @thread_safe_method
    def ufunc_out(self):
        np.add(self.buf, 1, out=self.buf)

    @thread_safe_method
    def inplace(self):
        a = self.buf
        a += 1

    @thread_safe_method
    def own_element(self, i):
        self.buf[i] += 1

    @thread_safe_method
    def raw_byte(self):
        self.raw[0] = (self.raw[0] + 1) % 256


@pytest.mark.parametrize("method", ["ufunc_out", "inplace"])
def test_in_place_numpy_writes_from_several_threads_race(checker, method):
    adapter = Arrays()
    run_threads(lambda i: [getattr(adapter, method)() for _ in range(10)])
    assert set(races(checker)) == {"buf"}
    assert isinstance(adapter.buf, np.ndarray) and adapter.buf.shape == (8,)


def test_numpy_elements_owned_by_one_thread_each_do_not_race(checker):
    adapter = Arrays()
    run_threads(lambda i: [adapter.own_element(i) for _ in range(25)])
    assert races(checker) == {}
    assert adapter.buf.tolist() == [25.0] * 4 + [0.0] * 4


def test_a_shared_numpy_array_is_a_view_so_other_references_see_the_same_memory(checker):
    original = np.zeros(3)

    class Holder(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self.a = original

    adapter = Holder()
    adapter.a[1] = 5
    assert original[1] == 5 and type(adapter.a[0:2]) is np.ndarray


def test_a_copy_of_a_tracked_array_stored_in_another_attribute_is_tracked_too(checker):
    adapter = Arrays()
    adapter.copy = adapter.buf.copy()
    run_threads(lambda i: [np.add(adapter.copy, 1, out=adapter.copy) for _ in range(10)])
    assert set(races(checker)) == {"copy"}


def test_bytearray_writes_from_several_threads_race(checker):
    adapter = Arrays()
    run_threads(lambda i: [adapter.raw_byte() for _ in range(10)])
    assert set(races(checker)) == {"raw"}


# -- one-time publication (double-checked locking) ----------------------------------------------

class Lazy(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self, recheck=True):
        super().__init__()
        self._lock = threading.Lock()
        self.recheck = recheck
        self.model = None

    @thread_safe_method
    def get(self, go=None):
        if go is not None:
            go.wait()
        if self.model is None:
            with self._lock:
                if not self.recheck or self.model is None:
                    self.model = ("built", threading.current_thread().name)
        return self.model


def test_an_object_published_once_under_a_lock_and_read_without_it_is_not_a_race(checker):
    adapter = Lazy()
    go = threading.Barrier(4)
    run_threads(lambda i: [adapter.get(go if n == 0 else None) for n in range(10)])
    assert races(checker) == {}


def test_a_binding_published_twice_while_read_without_the_lock_is_a_race(checker):
    adapter = Lazy()
    run_threads(lambda i: [adapter.get() for _ in range(5)], 2)
    with adapter._lock:
        adapter.model = None           # published again: no longer a one-time initialisation
    go = threading.Barrier(2)
    run_threads(lambda i: [adapter.get(go if n == 0 else None) for n in range(5)], 2)
    assert set(races(checker)) == {"model"}


# -- naming, strict mode, life cycle ------------------------------------------------------------

def test_locks_created_in_a_subclass_init_are_named_by_their_attribute(checker):
    class Base(ThreadSafeAdapter):
        __thread_safe__ = True

    class Child(Base):
        def __init__(self):
            super().__init__()                   # the base registers the adapter here
            self._stats_lock = threading.Lock()  # ... before this lock exists
            self.hits = 0

        @thread_safe_method
        def locked(self):
            with self._stats_lock:
                self.hits += 1

        @thread_safe_method
        def unlocked(self):
            self.hits += 1

    adapter = Child()
    go = threading.Barrier(2)

    def work(i):
        go.wait()
        for _ in range(20):
            adapter.locked() if i else adapter.unlocked()

    run_threads(work, 2)
    finding = races(checker)["hits"]
    held = {h for a in finding["conflict"] for h in a["locks_held"]}   # one thread holds it
    assert held == {"self._stats_lock"}
    assert "lock@" not in finding["message"]


def test_strict_mode_raises_for_a_numpy_race_in_the_offending_call():
    checker = ThreadSafetyChecker(enabled=True, strict_mode=True)
    try:
        adapter = Arrays()
        raised = []

        def work(i):
            for _ in range(10):
                try:
                    adapter.ufunc_out()
                except ThreadSafetyViolation as exc:
                    raised.append(exc)

        run_threads(work)
        assert len(raised) == 1 and raised[0].finding["attribute"] == "buf"
    finally:
        checker.close()


def test_the_primitives_are_patched_only_while_a_checker_is_enabled():
    put = queue.Queue.put
    assert not syncpoints.installed()
    disabled = ThreadSafetyChecker(enabled=False)
    assert queue.Queue.put is put and not syncpoints.installed()
    first = ThreadSafetyChecker(enabled=True)
    second = ThreadSafetyChecker(enabled=True)
    assert queue.Queue.put is not put and threading.Event.set.__wrapped__ is not None
    first.close()
    assert syncpoints.installed()           # the second still needs them
    second.close()
    assert queue.Queue.put is put and not syncpoints.installed()
    disabled.close()
