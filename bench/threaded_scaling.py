"""Threaded vs process server throughput (docs/benchmarks.md, "Threaded workers: scaling and the GIL").

    python3 bench/threaded_scaling.py [--seconds S] [--clients N] [--quick] [--json OUT.json]

In one run, against real servers on 127.0.0.1 (ThreadedShowcaseAdapter / ShowcaseAdapter tools):

  * `compute_intensive` (numpy matrix products + tanh: releases the GIL) and `python_intensive`
    (a pure-Python loop: holds the GIL), each through
      - grpc_server_threaded.py --max-workers 1, 2, 4
      - grpc_server_process.py --processes 2
  * the cost of --thread-safety-check: the same threaded server (4 workers) with and without it,
    for compute_intensive, python_intensive and the attribute-heavy `predict`.

Each configuration gets --clients closed-loop clients (each on its own connection, so the kernel
spreads them over the process server's processes) for --seconds after a warm-up. BLAS is pinned to
one thread per call (OPENBLAS_NUM_THREADS=1 ...) so that parallelism comes only from the server's
threads or processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.servers import WorkerServer  # noqa: E402

PINNED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
          "NUMEXPR_NUM_THREADS": "1"}
THREADED = "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter"

WORKLOADS = {
    "numpy (releases the GIL)": ("compute_intensive", {"data": list(range(1, 65)), "size": 192, "iterations": 6}),
    "pure Python (holds the GIL)": ("python_intensive", {"n": 80_000}),
    "predict (light, attribute-heavy)": ("predict", {"input_data": "bench"}),
}


def client_on_own_connection(address: str):
    """A BridgeClient whose channel has its own TCP connection (no shared subchannel)."""
    import grpc

    from snakepit_bridge.client import BridgeClient
    from snakepit_bridge.generated import snakepit_bridge_pb2_grpc as pb_grpc

    client = BridgeClient(address)
    client.channel.close()
    client.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    client.stub = pb_grpc.BridgeServiceStub(client.channel)
    return client


def load(server: WorkerServer, tool: str, args: dict, clients: int, seconds: float) -> dict:
    stubs = [client_on_own_connection(server.address) for _ in range(clients)]
    for c in stubs:   # warm-up: connect, import, first BLAS call
        c.execute(tool, args, timeout=120)
    latencies: list[list[float]] = [[] for _ in stubs]
    errors = []
    start_barrier = threading.Barrier(len(stubs) + 1)
    stop_at = [0.0]

    def run(i, c):
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                c.execute(tool, args, timeout=120)
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(repr(exc))
                return
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(stubs)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for c in stubs:
        c.close()
    flat = [x for lst in latencies for x in lst]
    return {"calls": len(flat), "seconds": elapsed, "per_second": len(flat) / elapsed,
            "p50_ms": statistics.median(flat) * 1000 if flat else float("nan"), "errors": errors[:3]}


def serve(mode: str, *args: str) -> WorkerServer:
    # the same adapter in both servers (the process server accepts any adapter)
    return WorkerServer(mode, "--adapter", THREADED, "--log-level", "WARNING", *args, env=PINNED, startup_timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 s per configuration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds

    configs = [("threaded", "--max-workers 1", ("--max-workers", "1")),
               ("threaded", "--max-workers 2", ("--max-workers", "2")),
               ("threaded", "--max-workers 4", ("--max-workers", "4")),
               ("process", "--processes 2", ("--processes", "2"))]
    rows = []
    for workload in ("numpy (releases the GIL)", "pure Python (holds the GIL)"):
        tool, targs = WORKLOADS[workload]
        for mode, label, flags in configs:
            with serve(mode, *flags) as server:
                r = load(server, tool, targs, args.clients, seconds)
            rows.append({"workload": workload, "server": f"{mode} {label}", **r})
            print(f"  {workload:32s} {mode} {label:18s} {r['per_second']:8.1f} calls/s  p50 {r['p50_ms']:7.1f} ms",
                  file=sys.stderr)
    check_rows = []
    for workload, (tool, targs) in WORKLOADS.items():
        for checked in (False, True):
            flags = ("--max-workers", "4") + (("--thread-safety-check",) if checked else ())
            with serve("threaded", *flags) as server:
                r = load(server, tool, targs, args.clients, seconds)
                if checked:
                    report = json.loads(server.client().stats().thread_safety_json)
                    r["findings"] = report["summary"]["findings"]
            check_rows.append({"workload": workload, "checker": "on" if checked else "off", **r})
            print(f"  {workload:32s} checker {'on ' if checked else 'off'} {r['per_second']:8.1f} calls/s",
                  file=sys.stderr)

    probe = getattr(sys, "_is_gil_enabled", None)
    gil = "GIL enabled" if probe is None or probe() else "GIL disabled"
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Python {platform.python_version()} ({gil}), {os.cpu_count()} CPUs, {platform.machine()}, "
          f"{args.clients} closed-loop clients, {seconds:.0f} s per configuration, load average {load_avg:.1f}")
    print()
    print("| workload | server | calls/s | speed-up vs 1 worker | p50 latency ms |")
    print("|---|---|---:|---:|---:|")
    for workload in ("numpy (releases the GIL)", "pure Python (holds the GIL)"):
        base = next(r["per_second"] for r in rows if r["workload"] == workload and r["server"].endswith("--max-workers 1"))
        for r in rows:
            if r["workload"] == workload:
                print(f"| {workload} | {r['server']} | {r['per_second']:.1f} | {r['per_second'] / base:.2f}x | "
                      f"{r['p50_ms']:.1f} |")
    print()
    print("| workload | threaded, 4 workers | calls/s | relative to checker off |")
    print("|---|---|---:|---:|")
    for workload in WORKLOADS:
        off = next(r["per_second"] for r in check_rows if r["workload"] == workload and r["checker"] == "off")
        for r in check_rows:
            if r["workload"] == workload:
                print(f"| {workload} | --thread-safety-check {r['checker']} | {r['per_second']:.1f} | "
                      f"{r['per_second'] / off:.2f} |")
    errors = [e for r in rows + check_rows for e in r["errors"]]
    if errors:
        print("\nerrors:", errors[:5])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "checker": check_rows, "python": platform.python_version(), "gil": gil,
                       "cpus": os.cpu_count(), "seconds": seconds, "clients": args.clients}, fh, indent=2)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
