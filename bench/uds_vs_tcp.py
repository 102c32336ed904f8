#!/usr/bin/env python3
"""Unix domain socket vs TCP loopback: what --uds saves per call, with the Python client.

    python3 bench/uds_vs_tcp.py                      # ~1 minute, prints the table
    python3 bench/uds_vs_tcp.py --quick              # a few seconds: does it run
    python3 bench/uds_vs_tcp.py --transports grpcio,grpclib --concurrency 1,8 --calls 3000 --seconds 10

In one run, for each --transports server stack: two threaded servers with the same flags and adapter
(ShowcaseAdapter), one on 127.0.0.1 and one on a Unix socket in a fresh /tmp directory. Each is
called with snakepit_bridge.client.BridgeClient (grpcio; one channel, so one connection, shared by
the --concurrency threads) for two workloads: the Ping RPC and a small ExecuteTool (`add`, two
integers). Each cell runs --calls calls or for --seconds, whichever ends first, after an unmeasured
warm-up; TCP and UDS take turns, round after round (--rounds), so that load from elsewhere falls on
both alike. The table shows the median calls/s of the rounds and p50/p99 latency over all calls, and
the load average before and after (the machine's other work skews both columns, but not one more
than the other).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from snakepit_bridge.client import BridgeClient  # noqa: E402
from tests.servers import SHOWCASE, WorkerServer  # noqa: E402

WORKLOADS = {
    "Ping": lambda client: client.ping(),
    "ExecuteTool add": lambda client: client.execute("add", {"a": 1, "b": 2}),
}
WARM_UP_CALLS = 200


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def run_cell(client: BridgeClient, call, concurrency: int, calls: int, seconds: float) -> dict:
    """`calls` calls spread over `concurrency` threads, each thread stopping early at the deadline."""
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]
    deadline = time.perf_counter() + seconds

    def worker(n: int) -> None:
        local = []
        for _ in range(n):
            started = time.perf_counter()
            call(client)
            finished = time.perf_counter()
            local.append(finished - started)
            if finished > deadline:
                break
        with lock:
            latencies.extend(local)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, shares))
    elapsed = time.perf_counter() - started
    return {"calls": len(latencies), "seconds": elapsed, "per_second": len(latencies) / elapsed,
            "latencies": latencies}


def summarise(runs: list[dict]) -> dict:
    latencies = sorted(x for run in runs for x in run["latencies"])
    return {"per_second": statistics.median(run["per_second"] for run in runs), "calls": len(latencies),
            "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000}


def measure(transport: str, concurrency_levels: list[int], calls: int, seconds: float, rounds: int) -> dict:
    socket_dir = tempfile.mkdtemp(prefix="snakepit-bench-uds-", dir="/tmp")
    flags = ("--adapter", SHOWCASE, "--max-workers", str(max(4, max(concurrency_levels))), "--log-level", "WARNING",
             "--transport", transport)
    servers = {"TCP": WorkerServer("threaded", *flags),
               "UDS": WorkerServer("threaded", *flags, "--uds", os.path.join(socket_dir, "bench.sock"))}
    runs: dict[tuple, list[dict]] = {}
    try:
        for server in servers.values():
            server.start()
        clients = {name: BridgeClient(server.address) for name, server in servers.items()}
        for client in clients.values():
            for call in WORKLOADS.values():
                for _ in range(WARM_UP_CALLS):
                    call(client)
        for round_number in range(rounds):
            for workload, call in WORKLOADS.items():
                for concurrency in concurrency_levels:
                    for name, client in clients.items():
                        run = run_cell(client, call, concurrency, calls, seconds)
                        runs.setdefault((workload, concurrency, name), []).append(run)
                        print(f"  {transport} round {round_number + 1} {workload:16s} x{concurrency:<3d} {name} "
                              f"{run['per_second']:8.0f} calls/s", file=sys.stderr)
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
        shutil.rmtree(socket_dir, ignore_errors=True)
    return {key: summarise(value) for key, value in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--transports", default="grpcio", help="comma-separated: grpcio, grpclib (default: %(default)s)")
    add("--concurrency", default="1,8", help="comma-separated threads per client (default: %(default)s)")
    add("--calls", type=int, default=2000, help="calls per cell at most (default: %(default)s)")
    add("--seconds", type=float, default=5.0, help="seconds per cell at most (default: %(default)s)")
    add("--rounds", type=int, default=3, help="TCP/UDS alternations (default: %(default)s)")
    add("--quick", action="store_true", help="300 calls, 2 s per cell, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.seconds, args.rounds = 300, 2.0, 1
    levels = [int(level) for level in args.concurrency.split(",")]
    transports = args.transports.split(",")

    before = load_average()
    results = {transport: measure(transport, levels, args.calls, args.seconds, args.rounds) for transport in transports}
    after = load_average()

    import grpc

    print(f"Python {platform.python_version()}, grpcio {grpc.__version__} client, {os.cpu_count()} CPUs, "
          f"{platform.machine()}; at most {args.calls} calls or {args.seconds:g} s per cell, {args.rounds} round(s), "
          f"TCP and UDS in turn; load average (1, 5, 15 min) before {before}, after {after}")
    print()
    print("| server transport | workload | threads | TCP p50 ms | UDS p50 ms | TCP p99 ms | UDS p99 ms "
          "| TCP calls/s | UDS calls/s | UDS / TCP calls/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for transport, cells in results.items():
        for workload in WORKLOADS:
            for concurrency in levels:
                tcp, uds = cells[(workload, concurrency, "TCP")], cells[(workload, concurrency, "UDS")]
                print(f"| {transport} | {workload} | {concurrency} | {tcp['p50_ms']:.3f} | {uds['p50_ms']:.3f} "
                      f"| {tcp['p99_ms']:.3f} | {uds['p99_ms']:.3f} | {tcp['per_second']:.0f} "
                      f"| {uds['per_second']:.0f} | {uds['per_second'] / tcp['per_second']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
