"""Specification of snakepit_bridge.batch.run_batch."""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import dataclasses
import multiprocessing as mp
import random
import threading
import time

import pytest

from snakepit_bridge.batch import BatchError, BatchOutcome, run_batch


# ---------------------------------------------------------------------------
# FLAWED REFERENCE -- the exception-isolation loop of
# openhcs-concurrency-model.rst (execute_compiled_plate), reduced to its
# essentials.  Kept only to show its flaws side by side.  Do not use.
# ---------------------------------------------------------------------------
def _flawed_doc_execute(fn, items, max_workers):
    results = []
    with cf.ThreadPoolExecutor(max_workers=max_workers) as executor:
        future_to_id = {executor.submit(fn, item): i for i, item in enumerate(items)}
        for future in cf.as_completed(future_to_id):
            try:
                results.append(future.result())  # FLAW: completion order, not input order
            except Exception as exc:
                results.append({"status": "error", "error": str(exc)})  # FLAW: type lost
    return results
# --------------------------- end of flawed reference -------------------------


def square_or_fail(x: int) -> int:
    """Module-level so a process pool can pickle it."""
    if x % 5 == 3:
        raise ValueError(f"bad item {x}")
    if x % 5 == 4:
        raise KeyError(x)
    return x * x


def test_completion_order_and_lost_error_type_is_fixed():
    def slow_first(x):
        time.sleep(0.2 if x == 0 else 0.0)  # item 0 finishes last
        if x == 2:
            raise ValueError("2")
        if x == 3:
            raise KeyError("2")
        return x

    flawed = _flawed_doc_execute(slow_first, range(4), 4)
    assert flawed[-1] == 0  # results arrive in completion order
    assert {"status": "error", "error": "2"} in flawed and "'2'" in str(flawed)
    # ...and a ValueError("2") and a KeyError("2") are indistinguishable by type.

    outcomes = run_batch(slow_first, range(4), 4)
    assert [o.ok for o in outcomes] == [True, True, False, False]
    assert [o.value for o in outcomes[:2]] == [0, 1]
    assert (outcomes[2].error.type, outcomes[2].error.message) == ("ValueError", "2")
    assert (outcomes[3].error.type, outcomes[3].error.message) == ("KeyError", "'2'")


def test_each_item_gets_its_own_outcome_in_input_order():
    def fn(x):
        time.sleep(random.random() * 0.002)
        return square_or_fail(x)

    outcomes = run_batch(fn, range(100), max_workers=8)
    assert len(outcomes) == 100
    for x, o in enumerate(outcomes):
        if x % 5 == 3:
            assert not o.ok and o.value is None
            assert o.error.type == "ValueError" and o.error.message == f"bad item {x}"
            assert "square_or_fail" in o.error.traceback and "ValueError" in o.error.traceback
            assert isinstance(o.error.exception, ValueError)
        elif x % 5 == 4:
            assert not o.ok and o.error.type == "KeyError" and o.error.message == str(x)
        else:
            assert o.ok and o.value == x * x and o.error is None


@pytest.mark.parametrize("items", [[7], list(range(5))])
def test_sequential_in_the_callers_thread_for_one_worker_or_one_item(items):
    caller = threading.get_ident()
    seen = []
    max_workers = 1 if len(items) > 1 else 8
    outcomes = run_batch(lambda x: seen.append(threading.get_ident()) or x, items, max_workers)
    assert [o.value for o in outcomes] == items
    assert set(seen) == {caller}


def test_empty_batch():
    assert run_batch(lambda x: x, [], 4) == []


def test_items_really_run_in_parallel():
    barrier = threading.Barrier(4, timeout=10)  # breaks (error outcomes) if run one by one
    outcomes = run_batch(lambda x: barrier.wait() >= 0, range(4), max_workers=4)
    assert all(o.ok and o.value for o in outcomes), outcomes


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("max_workers", [1, 2])
def test_base_exceptions_are_not_swallowed(exc_type, max_workers):
    started = []
    lock = threading.Lock()

    def fn(x):
        with lock:
            started.append(x)
        if x == 3:
            raise exc_type()
        time.sleep(0.01)
        return x

    with pytest.raises(exc_type):
        run_batch(fn, range(200), max_workers)
    assert len(started) < 200  # the rest of the batch was abandoned


def test_external_executor_gets_at_most_max_workers_in_flight():
    lock = threading.Lock()
    active = peak = 0

    def fn(x):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.01)
        with lock:
            active -= 1
        return square_or_fail(x)

    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = run_batch(fn, range(60), 3, executor=pool)
        assert pool.submit(lambda: 1).result() == 1  # not shut down by run_batch
    assert 2 <= peak <= 3
    assert [o.ok for o in outcomes] == [x % 5 < 3 for x in range(60)]


def test_process_pool_executor_isolates_errors_across_processes():
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork")) as pool:
        outcomes = run_batch(square_or_fail, range(20), 4, executor=pool)
    for x, o in enumerate(outcomes):
        if x % 5 == 3:
            assert (o.ok, o.error.type, o.error.message) == (False, "ValueError", f"bad item {x}")
            assert "square_or_fail" in o.error.traceback  # the remote traceback is kept
        elif x % 5 == 4:
            assert (o.ok, o.error.type) == (False, "KeyError")
        else:
            assert o.ok and o.value == x * x


def test_items_cannot_leak_context_variables_to_each_other_or_the_caller():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")

    def fn(x):
        before = var.get()
        var.set(f"item{x}")
        time.sleep(0.001)
        return before, var.get()

    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        for max_workers, executor in ((1, None), (4, None), (4, pool)):
            outcomes = run_batch(fn, range(8), max_workers, executor=executor)
            assert [o.value for o in outcomes] == [("caller", f"item{x}") for x in range(8)]
            assert var.get() == "caller"


def test_outcomes_are_immutable_and_compare_without_the_exception_object():
    a = BatchError.from_exception(ValueError("x"))
    b = BatchError("ValueError", "x", a.traceback, exception=None)
    assert a == b and "exception" not in repr(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.message = "y"  # type: ignore[misc]
    ok = BatchOutcome(ok=True, value=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.value = 2  # type: ignore[misc]
    assert ok.unwrap() == 1
    with pytest.raises(ValueError):
        BatchOutcome(ok=False, error=a).unwrap()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_invalid_max_workers_is_rejected(bad):
    with pytest.raises(ValueError):
        run_batch(lambda x: x, [1, 2], bad)  # type: ignore[arg-type]


def test_thread_stress_many_items_bounded_time():
    counter_lock = threading.Lock()
    calls = [0]

    def fn(x):
        with counter_lock:
            calls[0] += 1
        if x % 3 == 0:
            raise RuntimeError(str(x))
        return -x

    t0 = time.monotonic()
    outcomes = run_batch(fn, range(3000), max_workers=16)
    assert time.monotonic() - t0 < 60
    assert calls[0] == 3000
    assert [o.value if o.ok else o.error.message for o in outcomes] == [
        str(x) if x % 3 == 0 else -x for x in range(3000)
    ]
