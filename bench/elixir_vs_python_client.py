#!/usr/bin/env python3
"""Python side of bench/elixir_client.exs: the reference gRPC client calling a running worker.

    python bench/elixir_vs_python_client.py --port 50052 --tool ping --calls 2000 --concurrency 1,32
    python bench/elixir_vs_python_client.py --uds /run/user/1000/snakepit-1-2/w1.sock ...

Uses snakepit_bridge.client.BridgeClient (grpc.insecure_channel + the generated stubs, one channel
shared by all threads). For each concurrency level it runs `calls` ExecuteTool calls spread over that
many threads (after a warm-up) and prints one JSON object per level on stdout:

    {"concurrency": 32, "calls": 2000, "seconds": 1.23, "calls_per_s": 1626.0, "p50_ms": 0.6, "p99_ms": 2.1}

With `--plain N` it calls no server at all: N processes each call the adapter method `--tool` of
`--adapter` directly, `calls / N` times in a loop, started together; it prints one JSON object
(`processes`, `calls`, `seconds` of the slowest, `calls_per_s`, `ms_per_call` of one process). That is
what the machine allows without any RPC: the baseline of the pipelining part of the Elixir bench.
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


def plain_child(adapter_path: str, tool: str, args: dict, calls: int) -> int:
    """One process of `--plain`: load the adapter, say so, wait for the go line, call in a loop."""
    import importlib

    module, _, cls = adapter_path.rpartition(".")
    method = getattr(getattr(importlib.import_module(module), cls)(), tool)
    method(**args)  # warm
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    for _ in range(calls):
        method(**args)
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    return 0


def plain(processes: int, adapter_path: str, tool: str, args: dict, calls: int) -> dict:
    import subprocess

    per = calls // processes
    cmd = [sys.executable, os.path.abspath(__file__), "--plain-child", "--adapter", adapter_path, "--tool", tool,
           "--args", json.dumps(args), "--calls", str(per)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # start together
        p.stdin.write("go\n")
        p.stdin.flush()
    seconds = [json.loads(p.communicate()[0].strip().splitlines()[-1])["seconds"] for p in procs]
    total = per * processes
    return {"processes": processes, "calls": total, "seconds": max(seconds), "calls_per_s": total / max(seconds),
            "ms_per_call": 1000.0 * min(seconds) / per}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--uds", help="the worker's Unix socket (instead of --host/--port)")
    parser.add_argument("--plain", type=int, metavar="N", help="no server: N processes call the adapter directly")
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", default="snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter",
                        help="module.Class of --plain")
    parser.add_argument("--tool", default="ping")
    parser.add_argument("--args", default="{}", help="JSON object of tool arguments")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", default="1,32", help="comma-separated levels")
    opts = parser.parse_args()
    args = json.loads(opts.args)
    if opts.plain_child:
        return plain_child(opts.adapter, opts.tool, args, opts.calls)
    if opts.plain:
        print(json.dumps(plain(opts.plain, opts.adapter, opts.tool, args, opts.calls)), flush=True)
        return 0
    if opts.uds is None and opts.port is None:
        parser.error("--port or --uds is required")
    target = f"unix:{opts.uds}" if opts.uds else f"{opts.host}:{opts.port}"
    with BridgeClient(target) as client:
        for _ in range(opts.warmup):
            client.execute(opts.tool, args)
        for level in (int(c) for c in opts.concurrency.split(",")):
            print(json.dumps(run_level(client, opts.tool, args, opts.calls, level)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
