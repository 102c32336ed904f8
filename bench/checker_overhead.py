"""Cost per tracked access of the ThreadSafetyChecker: a reference version's (by default the
first-generation, lockset-only checker, commit 6373d0c, the last before the second) vs this
tree's, side by side in one run (docs/benchmarks.md, "ThreadSafetyChecker, second generation").

    python3 bench/checker_overhead.py [--ref 6373d0c] [--accesses N] [--repeats R] [--json OUT.json]

The reference checker is ``git archive REF snakepit_bridge`` unpacked in a temporary directory;
each measurement runs in a fresh child process importing one or the other (alternating, best of
R). A measurement: a thread other than the one that built the adapter runs a tight loop of one
kind of adapter state access, inside a ``@thread_safe_method`` call, with the checker enabled
and (as the baseline) disabled; µs per access = loop time / accesses.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, sys, threading, time
from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method
from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker

N = int(sys.argv[1]); ENABLED = sys.argv[2] == "on"; KIND = sys.argv[3]
checker = ThreadSafetyChecker(enabled=ENABLED)

class Bench(ThreadSafeAdapter):
    __thread_safe__ = True

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self.x = 0
        self.d = {"k": 0}
        self.items = []

    @thread_safe_method
    def run(self, n):
        t0 = time.perf_counter()
        if KIND == "attribute read+write":          # 2 accesses per step
            for _ in range(n):
                self.x = self.x + 1
        elif KIND == "same under self._lock":       # 3 (the lock read, x read, x write)
            for _ in range(n):
                with self._lock:
                    self.x = self.x + 1
        elif KIND == "dict item get+set":           # 4 (2 bindings, 2 items)
            for _ in range(n):
                self.d["k"] = self.d.get("k", 0) + 1
        elif KIND == "list append":                  # 2 (binding, contents)
            for _ in range(n):
                self.items.append(1)
        return time.perf_counter() - t0

PER_STEP = {"attribute read+write": 2, "same under self._lock": 3, "dict item get+set": 4,
            "list append": 2}[KIND]
adapter = Bench()
if ENABLED:
    checker.attach(adapter)
out = {}
def work():
    adapter.run(1000)                               # warm-up
    out["s"] = adapter.run(N)
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps({"us_per_access": out["s"] / (N * PER_STEP) * 1e6}))
'''

KINDS = ["attribute read+write", "same under self._lock", "dict item get+set", "list append"]


def measure(path: str, n: int, enabled: bool, kind: str) -> float:
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), "on" if enabled else "off", kind],
                         env=env, cwd=path, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["us_per_access"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the first-generation checker (lockset only): what the second generation is measured against
    ap.add_argument("--ref", default="6373d0c")
    ap.add_argument("--accesses", type=int, default=20000, help="loop steps per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as ref_dir:
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.ref, "snakepit_bridge"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", ref_dir], input=archive, check=True)
        trees = {"today": ref_dir, "new": ROOT}
        rows = []
        for kind in KINDS:
            for enabled in (False, True):
                best = {name: float("inf") for name in trees}
                for _ in range(args.repeats):
                    for name, path in trees.items():      # alternating: the same load for both
                        best[name] = min(best[name], measure(path, args.accesses, enabled, kind))
                rows.append({"kind": kind, "checker": "on" if enabled else "off",
                             "today_us": best["today"], "new_us": best["new"],
                             "ratio": best["new"] / best["today"]})
    load = os.getloadavg()
    gil = "GIL" if getattr(sys, "_is_gil_enabled", lambda: True)() else "no GIL"
    print(f"Python {platform.python_version()} ({gil}), "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"best of {args.repeats}, {args.accesses} loop steps, ref {args.ref}")
    print()
    print("| access | checker | today µs/access | new µs/access | new / today |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['checker']} | {r['today_us']:.3f} | {r['new_us']:.3f} | "
              f"{r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"load_average": load, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
