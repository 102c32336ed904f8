"""Do the checker's racy adapters really lose updates? Counts, per interpreter, in one run.

    python bench/lost_updates.py [--python PYTHON ...] [--threads 4] [--calls 200000]

Runs the guide's pitfall (`self.counter += 1` with no lock: tests/thread_safety_corpus/racy.py,
UnlockedAugmentedCounter) and its fix (the same under `acquire_lock()`) from --threads plain threads
calling the tool method directly, --calls calls in all, and reports how many increments were lost.
With the GIL a bytecode-level race like this one loses few or none (a thread switch must land inside
the read-modify-write); with the GIL off the threads really run at once.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(threads: int, calls: int) -> dict:
    sys.path.insert(0, ROOT)
    from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method, tool
    from tests.thread_safety_corpus.racy import UnlockedAugmentedCounter

    class LockedCounter(ThreadSafeAdapter):
        __thread_safe__ = True

        def __init__(self):
            super().__init__()
            self.counter = 0

        @thread_safe_method
        @tool
        def increment(self) -> None:
            with self.acquire_lock():
                self.counter += 1

    results = {}
    for name, cls in (("UnlockedAugmentedCounter (racy)", UnlockedAugmentedCounter), ("LockedCounter", LockedCounter)):
        adapter = cls()
        per_thread = calls // threads
        barrier = threading.Barrier(threads)

        def run():
            barrier.wait()
            for _ in range(per_thread):
                adapter.increment()

        pool = [threading.Thread(target=run) for _ in range(threads)]
        started = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        expected = per_thread * threads
        results[name] = {"expected": expected, "counted": adapter.counter, "lost": expected - adapter.counter,
                         "seconds": time.perf_counter() - started}
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return {"python": sys.version.split()[0], "gil": "on" if gil else "off", "results": results}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", default=None, help="interpreter (repeat; default: this one)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    rows = []
    for python in args.python or [sys.executable]:
        out = subprocess.run([python, os.path.abspath(__file__), "--child", str(args.threads), str(args.calls)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()[0]
    print(f"{args.threads} threads, {args.calls} calls of `increment` in all, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}")
    print()
    print("| interpreter | adapter | expected | counted | lost | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        for name, r in row["results"].items():
            print(f"| Python {row['python']}, GIL {row['gil']} | {name} | {r['expected']} | {r['counted']} | "
                  f"{r['lost']} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
