"""Request counters and per-tool latency, cheap enough for the hot path.

Latencies go into a log-scale histogram (8 buckets per doubling, 1 µs .. ~70 min), so p50/p99 cost
no memory growth and their error is under 10%.
"""
from __future__ import annotations

import math
import threading
import time

_BUCKETS_PER_DOUBLING = 8
_MIN_SECONDS = 1e-6
_BUCKET_COUNT = 32 * _BUCKETS_PER_DOUBLING


def _bucket(seconds: float) -> int:
    if seconds <= _MIN_SECONDS:
        return 0
    return min(_BUCKET_COUNT - 1, int(math.log2(seconds / _MIN_SECONDS) * _BUCKETS_PER_DOUBLING) + 1)


def _bucket_upper_seconds(index: int) -> float:
    return _MIN_SECONDS * 2 ** (index / _BUCKETS_PER_DOUBLING)


def cumulative_at_powers_of_two(histogram: list[int]) -> list[tuple[float, int]]:
    """(upper bound in seconds, calls at or under it) at every power of two of microseconds from 16 µs
    up: the histogram's own bucket edges, so each count is exact (what Prometheus buckets need)."""
    bounds = []
    below = 0
    for index, count in enumerate(histogram):
        below += count
        if index >= 4 * _BUCKETS_PER_DOUBLING and index % _BUCKETS_PER_DOUBLING == 0:
            bounds.append((_bucket_upper_seconds(index), below))
    return bounds


class ToolCounters:
    __slots__ = ("calls", "failures", "total_seconds", "max_seconds", "histogram")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.total_seconds = 0.0
        self.max_seconds = 0.0
        self.histogram = [0] * _BUCKET_COUNT

    def percentile_ms(self, fraction: float) -> float:
        if not self.calls:
            return 0.0
        rank = max(1, math.ceil(self.calls * fraction))
        seen = 0
        for index, count in enumerate(self.histogram):
            seen += count
            if seen >= rank:
                return min(_bucket_upper_seconds(index), self.max_seconds) * 1000.0
        return self.max_seconds * 1000.0


class ServerStats:
    def __init__(self) -> None:
        self.started_monotonic = time.monotonic()
        self.requests_total = 0
        self.requests_active = 0
        self.requests_failed = 0
        self.requests_queued = 0
        self.tools: dict[str, ToolCounters] = {}
        # (tool, status code name) -> calls that ended so; refusals of unknown tools count under ""
        self.outcomes: dict[tuple[str, str], int] = {}
        self.refusals: dict[str, int] = {}  # status code name -> calls refused before a tool ran
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            self.requests_total += 1
            self.requests_active += 1

    def finished(self, tool_name: str, seconds: float, failed: bool, code: str = "") -> None:
        """A call that ran ended after `seconds`; `code` is its status name (OK unless it failed)."""
        key = (tool_name, code or ("UNKNOWN" if failed else "OK"))
        with self._lock:
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            self.requests_active -= 1
            counters = self.tools.get(tool_name)
            if counters is None:
                counters = self.tools[tool_name] = ToolCounters()
            counters.calls += 1
            counters.total_seconds += seconds
            if seconds > counters.max_seconds:
                counters.max_seconds = seconds
            counters.histogram[_bucket(seconds)] += 1
            if failed:
                counters.failures += 1
                self.requests_failed += 1

    def rejected(self, tool_name: str = "", code: str = "UNKNOWN") -> None:
        """A call refused before it ran (bad arguments, unknown tool, queue full...)."""
        key = (tool_name, code)
        with self._lock:
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            self.refusals[code] = self.refusals.get(code, 0) + 1
            self.requests_total += 1
            self.requests_failed += 1

    def refused(self, code: str) -> None:
        """An admitted call turned away at the gate or the rate limiter (counted in `finished` too)."""
        with self._lock:
            self.refusals[code] = self.refusals.get(code, 0) + 1

    def queue_changed(self, delta: int) -> None:
        with self._lock:
            self.requests_queued += delta

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_monotonic

    def snapshot(self) -> dict:
        """Everything at once, under the lock: what a metrics scrape reads."""
        with self._lock:
            return {
                "requests_total": self.requests_total, "requests_active": self.requests_active,
                "requests_failed": self.requests_failed, "requests_queued": self.requests_queued,
                "outcomes": dict(self.outcomes), "refusals": dict(self.refusals),
                "tools": {name: (c.calls, c.total_seconds, list(c.histogram)) for name, c in self.tools.items()},
            }

    def tool_rows(self) -> list[dict]:
        with self._lock:
            rows = []
            for name, c in sorted(self.tools.items()):
                rows.append({
                    "name": name,
                    "calls": c.calls,
                    "failures": c.failures,
                    "mean_ms": (c.total_seconds / c.calls * 1000.0) if c.calls else 0.0,
                    "p50_ms": c.percentile_ms(0.50),
                    "p99_ms": c.percentile_ms(0.99),
                    "max_ms": c.max_seconds * 1000.0,
                })
            return rows
