"""Specification of snakepit_bridge.ratelimit.RateLimiter."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from snakepit_bridge.ratelimit import RateLimiter


# ---------------------------------------------------------------------------
# FLAWED REFERENCE -- RateLimiter from concurrency-chapter7.md, plus a
# try_acquire written in the same style.  Kept only to show the flaw side by
# side with the fix.  Do not use.
# ---------------------------------------------------------------------------
class _FlawedDocRateLimiter:
    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = float(rate)
        self.last_update = time.time()
        self._lock = threading.Lock()

    def wait_if_needed(self) -> None:
        with self._lock:
            now = time.time()
            elapsed = now - self.last_update
            self.tokens = min(self.rate, self.tokens + elapsed * self.rate)
            self.last_update = now
            if self.tokens < 1.0:
                wait_time = (1.0 - self.tokens) / self.rate
                time.sleep(wait_time)  # FLAW: sleeps while holding the lock
                self.tokens = 0.0
            else:
                self.tokens -= 1.0

    def try_acquire(self) -> bool:
        with self._lock:
            now = time.time()
            self.tokens = min(self.rate, self.tokens + (now - self.last_update) * self.rate)
            self.last_update = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False
# --------------------------- end of flawed reference -------------------------


class FakeTime:
    """A manual clock; sleep() advances it and records the request."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def fake_limiter(rate, burst=None):
    ft = FakeTime()
    return RateLimiter(rate, burst, clock=ft.clock, sleep=ft.sleep), ft


# --- token arithmetic (deterministic) ------------------------------------------------
def test_bucket_starts_full_and_refills_at_rate_up_to_burst():
    lim, ft = fake_limiter(rate=10, burst=3)
    assert [lim.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert lim.time_until_available() == pytest.approx(0.1)
    ft.now += 0.05
    assert not lim.try_acquire()
    ft.now += 0.05
    assert lim.try_acquire()
    ft.now += 100  # long idle: capped at burst
    assert lim.available == pytest.approx(3)
    assert lim.try_acquire(tokens=3) and not lim.try_acquire(tokens=0.5)


def test_default_burst_is_max_of_one_and_rate():
    assert RateLimiter(0.5).burst == 1.0  # the document's burst = rate would be 0.5: never a whole token
    assert RateLimiter(20).burst == 20.0
    assert RateLimiter(20, burst=2).burst == 2.0


def test_acquire_waits_exactly_the_needed_time_outside_the_lock():
    lim, ft = fake_limiter(rate=4, burst=1)
    assert lim.acquire()  # full bucket: no sleep
    assert ft.sleeps == []
    assert lim.acquire(timeout=1.0)
    assert ft.sleeps == [pytest.approx(0.25)]


def test_acquire_refuses_at_once_when_the_wait_exceeds_the_timeout():
    lim, ft = fake_limiter(rate=2, burst=1)
    assert lim.try_acquire()
    assert lim.acquire(timeout=0.1) is False  # needs 0.5 s
    assert lim.acquire(timeout=0) is False
    assert ft.sleeps == []  # refused without sleeping
    assert lim.available == pytest.approx(0)  # and nothing was reserved


def test_waiters_queue_and_try_acquire_cannot_barge_in():
    lim, ft = fake_limiter(rate=1, burst=1)
    assert lim.try_acquire()
    assert lim.reserve() == pytest.approx(1.0)  # first waiter
    assert lim.reserve() == pytest.approx(2.0)  # second waiter queues behind it
    assert lim.available == pytest.approx(-2)
    ft.now += 1.0
    assert not lim.try_acquire()  # the token that just arrived is promised to waiter 1
    assert lim.time_until_available() == pytest.approx(2.0)


def test_interrupted_wait_refunds_the_reservation():
    ft = FakeTime()

    def interrupted_sleep(_s):
        raise KeyboardInterrupt

    lim = RateLimiter(1, 1, clock=ft.clock, sleep=interrupted_sleep)
    assert lim.try_acquire()
    with pytest.raises(KeyboardInterrupt):
        lim.acquire()
    assert lim.available == pytest.approx(0)  # not -1: the reservation was returned


def test_clock_going_backwards_mints_no_tokens():
    lim, ft = fake_limiter(rate=10, burst=1)
    assert lim.try_acquire()
    ft.now -= 5
    assert not lim.try_acquire()
    ft.now += 5.05
    assert not lim.try_acquire()  # only 0.05 s of real progress -> 0.5 token
    ft.now += 0.06
    assert lim.try_acquire()


@pytest.mark.parametrize(
    "kwargs", [dict(rate=0), dict(rate=-1), dict(rate=float("inf")), dict(rate=1, burst=0), dict(rate=float("nan"))]
)
def test_invalid_configuration_is_rejected(kwargs):
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)


def test_impossible_or_invalid_token_counts_are_rejected():
    lim = RateLimiter(10, burst=2)
    with pytest.raises(ValueError):
        lim.acquire(tokens=3)  # would wait forever
    with pytest.raises(ValueError):
        lim.try_acquire(tokens=0)
    with pytest.raises(ValueError):
        lim.time_until_available(tokens=-1)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 1000),
    burst=st.floats(1, 50),
    ops=st.lists(
        st.tuples(st.sampled_from(["try", "acquire", "reserve", "advance"]), st.floats(0, 2)),
        max_size=60,
    ),
)
def test_never_grants_more_than_burst_plus_rate_times_elapsed(rate, burst, ops):
    """Whatever the interleaving of calls and clock steps, the k-th token to
    become usable is usable no earlier than (k + 1 - burst) / rate after start,
    and no window holds more than burst + rate * window usable tokens."""
    lim, ft = fake_limiter(rate, burst)
    start = ft.now
    usable_at: list[float] = []
    for op, x in ops:
        if op == "advance":
            ft.now += x
        elif op == "try":
            if lim.try_acquire():
                usable_at.append(ft.now)
        elif op == "acquire":
            if lim.acquire(timeout=x):  # the fake sleep advances the clock
                usable_at.append(ft.now)
        else:
            wait = lim.reserve(max_wait=x)
            if wait is not None:
                assert wait <= x + 1e-9
                usable_at.append(ft.now + wait)
    times = sorted(usable_at)
    for k, t in enumerate(times):
        assert k + 1 <= burst + rate * (t - start) + 1e-6, (k, t - start)
    # and in every window: at most burst + rate * window tokens (the bucket's cap)
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - times[i]) + 1e-6, (i, j)


# --- the document's flaw, fixed --------------------------------------------------------
def _latency_of_try_acquire_while_another_thread_waits(limiter, start_waiter) -> float:
    """Start a waiter that must wait ~1 s, then time a try_acquire from another thread."""
    waiter = threading.Thread(target=start_waiter)
    waiter.start()
    time.sleep(0.1)  # let the waiter get into its wait
    t0 = time.monotonic()
    limiter.try_acquire()
    latency = time.monotonic() - t0
    waiter.join(10)
    return latency


def test_sleeping_under_the_lock_is_fixed():
    """The document's limiter sleeps with its lock held: every other thread --
    even one that only wants to *check* for a token -- is stuck behind the
    sleeper.  Ours sleeps outside the lock, so try_acquire answers at once."""
    flawed = _FlawedDocRateLimiter(rate=1)
    flawed.wait_if_needed()  # empty the bucket
    flawed_latency = _latency_of_try_acquire_while_another_thread_waits(flawed, flawed.wait_if_needed)

    fixed = RateLimiter(rate=1, burst=1)
    assert fixed.try_acquire()
    fixed_latency = _latency_of_try_acquire_while_another_thread_waits(fixed, fixed.acquire)

    assert flawed_latency > 0.5, flawed_latency  # blocked for the rest of the ~1 s sleep
    assert fixed_latency < 0.4, fixed_latency  # generous: typically microseconds


def test_a_long_waiter_does_not_delay_a_short_deadline():
    """With the lock held during sleeps, a caller with a short deadline would sit
    behind a long sleeper; ours refuses it as soon as it asks."""
    lim = RateLimiter(rate=1, burst=1)
    assert lim.try_acquire()
    long_waiter = threading.Thread(target=lim.acquire)  # reserves the next token, sleeps ~1 s
    long_waiter.start()
    give_up = time.monotonic() + 10
    while lim.available > -0.5 and time.monotonic() < give_up:  # until its reservation is made
        time.sleep(0.005)
    t0 = time.monotonic()
    assert lim.acquire(timeout=0.2) is False
    assert time.monotonic() - t0 < 0.4
    assert lim.time_until_available() > 1.0  # it sees the queue: ~1.9 s
    long_waiter.join(10)


# --- thread stress ------------------------------------------------------------------------
def test_threads_respect_the_rate_and_burst():
    rate, burst, total, n_threads = 50.0, 5.0, 60, 8
    t_created = time.monotonic()
    lim = RateLimiter(rate, burst)
    stamps: list[float] = []
    stamps_lock = threading.Lock()
    per_thread = [total // n_threads + (1 if i < total % n_threads else 0) for i in range(n_threads)]

    def worker(n):
        for _ in range(n):
            assert lim.acquire(timeout=30)
            with stamps_lock:
                stamps.append(time.monotonic())

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,)) for n in per_thread]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    elapsed = time.monotonic() - t0
    assert len(stamps) == total
    # (total - burst) tokens had to be minted at `rate`: at least 1.1 s
    assert elapsed >= (total - burst) / rate * 0.95
    assert elapsed < 10  # generous bound for a loaded 2-core machine
    # The k-th grant (0-based) cannot return before (k + 1 - burst) / rate seconds
    # after the bucket was created.  Stamps are taken after acquire returns, so
    # scheduling delays only make them later: this bound cannot fail spuriously.
    stamps.sort()
    for k, stamp in enumerate(stamps):
        assert stamp - t_created >= (k + 1 - burst) / rate - 0.005, (k, stamp - t_created)


def test_try_acquire_from_many_threads_never_over_grants():
    t0 = time.monotonic()
    lim = RateLimiter(rate=200, burst=10)
    granted = [0] * 8
    stop = time.monotonic() + 1.0

    def worker(i):
        while time.monotonic() < stop:
            if lim.try_acquire():
                granted[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    elapsed = time.monotonic() - t0
    assert sum(granted) <= 10 + 200 * elapsed + 1
    assert sum(granted) >= 50  # and it does grant (a quarter of the rate: generous)


# --- process stress -------------------------------------------------------------------------
def _process_hammer(lim: RateLimiter, seconds: float, q) -> None:
    counts = [0] * 4
    stop = time.monotonic() + seconds

    def worker(i):
        while time.monotonic() < stop:
            if lim.acquire(timeout=0.05):
                counts[i] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    q.put((sum(counts), time.monotonic() - t0))


def test_forked_processes_each_enforce_their_own_limit_even_if_forked_mid_lock():
    """Each worker process has its own bucket (the server's --rate-limit is per
    worker).  Children forked while a parent thread holds the limiter's lock
    must not deadlock on it."""
    rate, burst = 100.0, 5.0
    lim = RateLimiter(rate, burst)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    holding, release = threading.Event(), threading.Event()

    def hold_lock():
        with lim._lock:  # white-box: simulate a thread mid-call at fork time
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    holding.wait(10)
    procs = [ctx.Process(target=_process_hammer, args=(lim, 1.0, q)) for _ in range(4)]
    for p in procs:
        p.start()
    release.set()
    holder.join(10)
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for granted, elapsed in results:
        assert granted <= burst + rate * elapsed + 1
        assert granted >= 0.3 * rate * 1.0  # generous lower bound on a loaded machine
