"""A thread-safe token bucket that never sleeps while holding its lock.

The bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per
second.  A caller that has to wait *reserves* its tokens under the lock (the
balance may go negative: that is the queue of reserved callers), releases the
lock, and only then sleeps until its reservation matures.  So:

* other threads are never blocked by a sleeper: ``try_acquire`` and
  ``time_until_available`` answer immediately;
* waiters are served in the order they reserved (no barging by
  ``try_acquire``, since a negative balance means "no tokens");
* a caller whose needed wait exceeds its ``timeout`` is refused at once instead
  of sleeping for nothing -- its deadline could never have been met.

Time comes from ``time.monotonic`` (wall-clock jumps do not mint or destroy
tokens).  The limiter is per process; in a forked child its lock is replaced,
so a fork taken while another thread held it cannot deadlock the child.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from typing import Callable

__all__ = ["RateLimiter"]

_ALL: "weakref.WeakSet[RateLimiter]" = weakref.WeakSet()

# Refills accumulate float error (0.1 s at 10/s can come out as 0.9999999
# tokens); a deficit this small counts as "enough".
_EPS = 1e-9


class RateLimiter:
    """Token bucket: ``rate`` tokens per second, at most ``burst`` stored.

    Args:
        rate: tokens added per second (> 0).
        burst: bucket capacity, i.e. how many calls may go through at once after
            an idle period; defaults to ``max(1, rate)``.  The bucket starts full.
        clock: monotonic time source in seconds (injectable for tests).
        sleep: sleep function (injectable for tests).
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        rate = float(rate)
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, got {rate}")
        burst = max(1.0, rate) if burst is None else float(burst)
        if not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"burst must be a positive finite number, got {burst}")
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = burst  # negative = tokens already promised to sleeping waiters
        self._last = clock()
        _ALL.add(self)

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """Bucket capacity."""
        return self._burst

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self._rate:g}, burst={self._burst:g})"

    # -- internals (caller holds self._lock) ----------------------------------------
    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:  # a clock that stalls must not be read as going backwards
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now

    def _wait_for(self, tokens: float) -> float:
        deficit = tokens - self._tokens
        return 0.0 if deficit <= _EPS else deficit / self._rate

    def _check(self, tokens: float) -> float:
        tokens = float(tokens)
        if not (tokens > 0 and math.isfinite(tokens)):
            raise ValueError(f"tokens must be a positive finite number, got {tokens}")
        if tokens > self._burst:
            raise ValueError(f"asking for {tokens:g} tokens can never succeed: burst is {self._burst:g}")
        return tokens

    # -- public API -----------------------------------------------------------------------
    @property
    def available(self) -> float:
        """Tokens available now (negative while waiters hold reservations)."""
        with self._lock:
            self._refill()
            return self._tokens

    def time_until_available(self, tokens: float = 1.0) -> float:
        """Seconds until ``tokens`` could be taken, counting queued waiters (0 if now)."""
        tokens = self._check(tokens)
        with self._lock:
            self._refill()
            return self._wait_for(tokens)

    def try_acquire(self, tokens: float = 1.0) -> bool:
        """Take ``tokens`` if available right now; never waits."""
        tokens = self._check(tokens)
        with self._lock:
            self._refill()
            if self._tokens >= tokens - _EPS:
                self._tokens -= tokens
                return True
            return False

    def reserve(self, tokens: float = 1.0, max_wait: float | None = None) -> float | None:
        """Reserve ``tokens`` and return how long to wait before using them.

        Returns ``None`` (and reserves nothing) when the wait would exceed
        ``max_wait``.  The caller must then wait the returned number of seconds
        itself; :meth:`acquire` does exactly that.
        """
        tokens = self._check(tokens)
        with self._lock:
            self._refill()
            wait = self._wait_for(tokens)
            if max_wait is not None and wait > max(0.0, max_wait):
                return None
            self._tokens -= tokens
            return wait

    def refund(self, tokens: float = 1.0) -> None:
        """Give back reserved tokens that will not be used (capped at ``burst``)."""
        tokens = self._check(tokens)
        with self._lock:
            self._refill()
            self._tokens = min(self._burst, self._tokens + tokens)

    def acquire(self, timeout: float | None = None, tokens: float = 1.0) -> bool:
        """Take ``tokens``, waiting up to ``timeout`` seconds (``None``: as long as needed).

        Returns False -- at once, without sleeping -- if the tokens cannot be had
        within ``timeout``.  The wait happens outside the lock.  If the wait is
        interrupted (e.g. ``KeyboardInterrupt``) the reservation is refunded.
        """
        wait = self.reserve(tokens, timeout)
        if wait is None:
            return False
        if wait > 0:
            try:
                self._sleep(wait)  # the lock is NOT held here
            except BaseException:
                self.refund(tokens)
                raise
        return True

    def wait_if_needed(self) -> None:
        """Block until one token is available and take it (the document's name)."""
        self.acquire()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


def _after_fork_in_child() -> None:
    for limiter in list(_ALL):
        limiter._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
