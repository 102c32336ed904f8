"""Micro-benchmarks of the concurrency toolkit (docs/benchmarks.md, "Concurrency toolkit").

    python3 bench/toolkit.py [--quick] [--json OUT.json]

Measures, on this machine:
  * RNG draws/s: one shared (locked) RNG vs per-thread streams, 1..8 threads;
    cost of derive_rng (the per-request RNG);
  * RateLimiter: try_acquire calls/s (1 and 8 threads), and how long a
    try_acquire is blocked while another thread waits for a token -- the
    document's sleep-under-the-lock version vs ours;
  * SafeCheckpoint.update latency, durable (fsync) and not;
  * run_batch overhead per item vs a plain loop.
Numbers are wall-clock; with the GIL, threads add no CPU parallelism for
pure-Python work, so the point is contention overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snakepit_bridge.batch import run_batch  # noqa: E402
from snakepit_bridge.checkpoint import SafeCheckpoint  # noqa: E402
from snakepit_bridge.ratelimit import RateLimiter  # noqa: E402
from snakepit_bridge.rng import RNG, derive_rng, get_rng, set_global_seed  # noqa: E402


def _threads(n: int, target) -> float:
    barrier = threading.Barrier(n + 1)

    def run():
        barrier.wait()
        target()

    ts = [threading.Thread(target=run) for _ in range(n)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def bench_rng(draws: int) -> dict:
    out: dict = {"shared_locked": {}, "thread_local": {}}
    set_global_seed(1)
    shared = RNG(1)
    for n in (1, 2, 4, 8):
        per = draws // n

        def use_shared():
            for _ in range(per):
                shared.uniform(0, 1)

        def use_local():
            r = get_rng(thread_safe=True)
            for _ in range(per):
                r.uniform(0, 1)

        out["shared_locked"][n] = round(per * n / _threads(n, use_shared))
        out["thread_local"][n] = round(per * n / _threads(n, use_local))
    import random

    plain = random.Random(1)
    t0 = time.perf_counter()
    for _ in range(draws):
        plain.uniform(0, 1)
    out["plain_random_Random_1_thread"] = round(draws / (time.perf_counter() - t0))
    k = 2000
    t0 = time.perf_counter()
    for i in range(k):
        derive_rng(7, "session", i)
    out["derive_rng_us"] = round((time.perf_counter() - t0) / k * 1e6, 1)
    return out


class _FlawedDocRateLimiter:
    """concurrency-chapter7.md's limiter (sleeps holding the lock) + a try_acquire in its style."""

    def __init__(self, rate):
        self.rate, self.tokens, self.last = rate, float(rate), time.time()
        self._lock = threading.Lock()

    def _refill(self):
        now = time.time()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def wait_if_needed(self):
        with self._lock:
            self._refill()
            if self.tokens < 1.0:
                time.sleep((1.0 - self.tokens) / self.rate)
                self.tokens = 0.0
            else:
                self.tokens -= 1.0

    def try_acquire(self):
        with self._lock:
            self._refill()
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


def _probe_latency(limiter, wait_fn, probes: int = 20) -> float:
    """Max latency of try_acquire while another thread waits ~0.5 s for a token."""
    stop = threading.Event()

    def waiter():
        while not stop.is_set():
            wait_fn()

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    time.sleep(0.05)
    worst = 0.0
    for _ in range(probes):
        t0 = time.perf_counter()
        limiter.try_acquire()
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.02)
    stop.set()
    th.join(5)
    return worst


def bench_ratelimit(calls: int) -> dict:
    out: dict = {}
    for n in (1, 8):
        lim = RateLimiter(rate=1e12, burst=1e12)
        per = calls // n

        def hammer():
            for _ in range(per):
                lim.try_acquire()

        out[f"try_acquire_per_s_{n}_threads"] = round(per * n / _threads(n, hammer))
    flawed = _FlawedDocRateLimiter(rate=2)
    fixed = RateLimiter(rate=2, burst=1)
    out["try_acquire_worst_latency_while_other_waits_ms"] = {
        "document_version": round(_probe_latency(flawed, flawed.wait_if_needed) * 1e3, 1),
        "snakepit_bridge": round(_probe_latency(fixed, fixed.acquire) * 1e3, 3),
    }
    return out


def bench_checkpoint(updates: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for durable in (True, False):
            cp = SafeCheckpoint(os.path.join(d, f"c{durable}.json"), durable=durable)
            t0 = time.perf_counter()
            for _ in range(updates):
                cp.update(lambda s: {**s, "n": s.get("n", 0) + 1})
            key = "update_ms_durable" if durable else "update_ms_no_fsync"
            out[key] = round((time.perf_counter() - t0) / updates * 1e3, 3)
        out["filesystem_dir"] = d
    return out


def bench_batch(items: int) -> dict:
    data = list(range(items))
    t0 = time.perf_counter()
    [x * 2 for x in data]
    base = time.perf_counter() - t0
    out = {}
    for w in (1, 4, 8):
        t0 = time.perf_counter()
        run_batch(lambda x: x * 2, data, w)
        out[f"us_per_item_max_workers_{w}"] = round((time.perf_counter() - t0 - base) / items * 1e6, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    scale = 10 if a.quick else 1
    results = {
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "rng_draws_per_s": bench_rng(400_000 // scale),
        "ratelimit": bench_ratelimit(400_000 // scale),
        "checkpoint": bench_checkpoint(200 // scale),
        "run_batch_overhead": bench_batch(20_000 // scale),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
