#!/usr/bin/env python3
"""Python side of bench/elixir_client.exs: the reference gRPC client calling a running worker.

    python bench/elixir_vs_python_client.py --port 50052 --tool ping --calls 2000 --concurrency 1,32

Uses snakepit_bridge.client.BridgeClient (grpc.insecure_channel + the generated stubs, one channel
shared by all threads). For each concurrency level it runs `calls` ExecuteTool calls spread over that
many threads (after a warm-up) and prints one JSON object per level on stdout:

    {"concurrency": 32, "calls": 2000, "seconds": 1.23, "calls_per_s": 1626.0, "p50_ms": 0.6, "p99_ms": 2.1}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snakepit_bridge.client import BridgeClient  # noqa: E402


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def run_level(client: BridgeClient, tool: str, args: dict, calls: int, concurrency: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]

    def worker(n: int) -> None:
        local = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.execute(tool, args)
            local.append((time.perf_counter() - t0) * 1000.0)
        with lock:
            latencies.extend(local)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, per_thread))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"concurrency": concurrency, "calls": calls, "seconds": seconds, "calls_per_s": calls / seconds,
            "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tool", default="ping")
    parser.add_argument("--args", default="{}", help="JSON object of tool arguments")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", default="1,32", help="comma-separated levels")
    opts = parser.parse_args()
    args = json.loads(opts.args)
    with BridgeClient(f"{opts.host}:{opts.port}") as client:
        for _ in range(opts.warmup):
            client.execute(opts.tool, args)
        for level in (int(c) for c in opts.concurrency.split(",")):
            print(json.dumps(run_level(client, opts.tool, args, opts.calls, level)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
