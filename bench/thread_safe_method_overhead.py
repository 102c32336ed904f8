"""Cost of @thread_safe_method per call (docs/benchmarks.md, "Thread-safety decorator and checker").

    python3 bench/thread_safe_method_overhead.py [--calls N] [--json OUT.json]

Times one million-ish calls of the same tiny method, plain and decorated, in one thread and in
4 threads at once, with no checker and with an enabled ThreadSafetyChecker tracking the adapter.
The target: with the checker disabled, the decorator adds under 5 µs a call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snakepit_bridge import thread_safety_checker as tsc  # noqa: E402
from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method  # noqa: E402
from snakepit_bridge.threadsafety.interpreter import gil_enabled  # noqa: E402
from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker  # noqa: E402


def make_class():
    class Bench(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self.scale = 3

        def plain(self, x):
            return x + 1

        @thread_safe_method
        def tracked(self, x):
            return x + 1

        def plain_state(self, x):
            with self.acquire_lock():
                self.scale = self.scale + x - x
                return self.scale

        @thread_safe_method
        def tracked_state(self, x):
            with self.acquire_lock():
                self.scale = self.scale + x - x
                return self.scale

    return Bench


def per_call_us(fn, calls: int, threads: int) -> float:
    """Wall time per call (µs) with `threads` threads each making calls/threads calls."""
    each = calls // threads
    barrier = threading.Barrier(threads + 1)
    done = []

    def work():
        barrier.wait()
        for i in range(each):
            fn(i)
        done.append(time.perf_counter())

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return (max(done) - start) / (each * threads) * 1e6


def best_of(fn, calls, threads, repeats=5):
    return min(per_call_us(fn, calls, threads) for _ in range(repeats))


def measure(calls: int) -> list[dict]:
    rows = []
    for checker_on in (False, True):
        checker = ThreadSafetyChecker(enabled=True) if checker_on else None
        try:
            adapter = make_class()()
            if checker is not None:
                checker.attach(adapter)
            for threads in (1, 4):
                for what, plain, tracked in (("trivial method", adapter.plain, adapter.tracked),
                                             ("locked read-modify-write", adapter.plain_state,
                                              adapter.tracked_state)):
                    n = calls if not checker_on else max(calls // 10, 20_000)
                    p = best_of(plain, n, threads)
                    t = best_of(tracked, n, threads)
                    rows.append({"checker": "enabled" if checker_on else "disabled", "threads": threads,
                                 "method": what, "plain_us": p, "decorated_us": t, "overhead_us": t - p})
        finally:
            if checker is not None:
                checker.close()
    assert tsc.get_active_checker() is None
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure(args.calls)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Python {platform.python_version()} ({'GIL enabled' if gil_enabled() else 'GIL disabled'}), "
          f"{os.cpu_count()} CPUs, {platform.machine()}, load average {load:.1f} (best of 5 runs each)")
    print()
    print("| checker | threads | method | plain µs/call | @thread_safe_method µs/call | overhead µs |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['checker']} | {r['threads']} | {r['method']} | {r['plain_us']:.2f} | "
              f"{r['decorated_us']:.2f} | {r['overhead_us']:.2f} |")
    disabled = [r["overhead_us"] for r in rows if r["checker"] == "disabled" and r["threads"] == 1]
    verdict = "PASS" if max(disabled) < 5.0 else "FAIL"
    print()
    print(f"target: under 5 µs added per call with the checker disabled (1 thread): "
          f"{max(disabled):.2f} µs -> {verdict}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "python": platform.python_version()}, fh, indent=2)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
