"""Threaded vs process server throughput (docs/benchmarks.md, "Threaded workers: scaling and the GIL").

    python3 bench/threaded_scaling.py [--seconds S] [--clients N] [--quick] [--json OUT.json]
        [--server-python PYTHON ...]   # e.g. also the free-threaded venv's: compared in the same run

In one run, against real servers on 127.0.0.1 (ThreadedShowcaseAdapter / ShowcaseAdapter tools):

  * `compute_intensive` (numpy matrix products + tanh: releases the GIL) and `python_intensive`
    (a pure-Python loop: holds the GIL), each through
      - grpc_server_threaded.py --max-workers 1, 2, 4
      - grpc_server_process.py --processes 2
  * the cost of --thread-safety-check: the same threaded server (4 workers) with and without it,
    for compute_intensive, python_intensive and the attribute-heavy `predict`.

Every --server-python (default: this interpreter) gets all of the above, in interleaved rounds; each
server picks its transport as `--transport auto` does (grpclib on a free-threaded build, GIL off). The
clients always run here, with grpcio, on the same 2 cores as the servers.

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


def serve(python: str, mode: str, *args: str) -> WorkerServer:
    # the same adapter in both servers (the process server accepts any adapter)
    return WorkerServer(mode, "--adapter", THREADED, "--log-level", "WARNING", *args, env=PINNED, startup_timeout=120,
                        python=python)


def describe(python: str) -> str:
    """'3.13.5, GIL off' for an interpreter, as its servers will run."""
    import subprocess

    probe = "import platform, sys; print(platform.python_version(), getattr(sys, '_is_gil_enabled', lambda: True)())"
    version, gil = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return f"Python {version}, GIL {'on' if gil == 'True' else 'off'}"


def in_process_elsewhere(python: str, tool: str, args: dict, threads: int, seconds: float) -> float:
    """`in_process` run by `python` (another interpreter: the free-threaded one)."""
    import subprocess

    if python == sys.executable:
        return in_process(tool, args, threads, seconds)
    out = subprocess.run([python, os.path.abspath(__file__), "--local", tool, json.dumps(args), str(threads),
                          str(seconds)], capture_output=True, text=True, check=True, env={**os.environ, **PINNED})
    return float(out.stdout.strip().splitlines()[-1])


def in_process(tool: str, args: dict, threads: int, seconds: float) -> float:
    """Calls/s of the adapter method itself from `threads` plain threads: the GIL without gRPC."""
    from snakepit_bridge.adapters.threaded_showcase import ThreadedShowcaseAdapter

    adapter = ThreadedShowcaseAdapter()
    method = getattr(adapter, tool)
    method(**args)
    counts = [0] * threads
    stop_at = [0.0]
    barrier = threading.Barrier(threads + 1)

    def run(i):
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            method(**args)
            counts[i] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


_SOLO = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from snakepit_bridge.adapters.threaded_showcase import ThreadedShowcaseAdapter
adapter = ThreadedShowcaseAdapter()
method = getattr(adapter, sys.argv[2]); args = json.loads(sys.argv[3]); seconds = float(sys.argv[4])
method(**args)
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()
n, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    method(**args); n += 1
print(n)
"""


def in_processes(python: str, tool: str, args: dict, processes: int, seconds: float) -> float:
    """Calls/s of the adapter method in `processes` separate single-threaded processes at once:
    what the machine itself allows (no GIL shared, no gRPC)."""
    import subprocess

    procs = [subprocess.Popen([python, "-c", _SOLO, ROOT, tool, json.dumps(args), str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **PINNED})
             for _ in range(processes)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:   # start together
        p.stdin.write("go\n")
        p.stdin.flush()
    total = sum(int(p.communicate()[0].strip().splitlines()[-1]) for p in procs)
    return total / seconds


def best(results: list[dict]) -> dict:
    """The round with the highest throughput (the least disturbed by other load on the machine),
    plus the median throughput over rounds."""
    top = max(results, key=lambda r: r["per_second"])
    return {**top, "median_per_second": statistics.median(r["per_second"] for r in results),
            "rounds": [round(r["per_second"], 1) for r in results]}


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--local":  # one in-process measurement, for another interpreter
        _, _, tool, targs, threads, seconds = sys.argv
        print(in_process(tool, json.loads(targs), int(threads), float(seconds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration and round (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all configurations, interleaved; the best round is reported (default 3)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per configuration")
    parser.add_argument("--server-python", action="append", default=None,
                        help="interpreter for the servers (repeat to compare; default: this one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)
    os.environ.update(PINNED)   # for the in-process part (numpy reads it at import)
    pythons = args.server_python or [sys.executable]
    names = {python: describe(python) for python in pythons}

    configs = [("threaded", "--max-workers 1", ("--max-workers", "1")),
               ("threaded", "--max-workers 2", ("--max-workers", "2")),
               ("threaded", "--max-workers 4", ("--max-workers", "4")),
               ("process", "--processes 2", ("--processes", "2"))]
    server_runs: dict[tuple, list] = {}
    check_runs: dict[tuple, list] = {}
    local_runs: dict[tuple, list] = {}
    for rnd in range(rounds):
        for python in pythons:
            name = names[python]
            for workload in ("numpy (releases the GIL)", "pure Python (holds the GIL)"):
                tool, targs = WORKLOADS[workload]
                for threads in (1, 2, 4):
                    r = in_process_elsewhere(python, tool, targs, threads, seconds)
                    local_runs.setdefault((name, workload, threads), []).append({"per_second": r, "calls": 0})
                r = in_processes(python, tool, targs, 2, seconds)
                local_runs.setdefault((name, workload, "2 processes"), []).append({"per_second": r, "calls": 0})
                for mode, label, flags in configs:
                    with serve(python, mode, *flags) as server:
                        r = load(server, tool, targs, args.clients, seconds)
                    server_runs.setdefault((name, workload, f"{mode} {label}"), []).append(r)
                    print(f"  round {rnd + 1} {name} {workload:32s} {mode} {label:18s} {r['per_second']:8.1f} calls/s",
                          file=sys.stderr)
            for workload, (tool, targs) in WORKLOADS.items():
                for checked in (False, True):
                    flags = ("--max-workers", "4") + (("--thread-safety-check",) if checked else ())
                    with serve(python, "threaded", *flags) as server:
                        r = load(server, tool, targs, args.clients, seconds)
                        if checked:
                            report = json.loads(server.client().stats().thread_safety_json)
                            r["findings"] = report["summary"]["findings"]
                    check_runs.setdefault((name, workload, checked), []).append(r)
                    print(f"  round {rnd + 1} {name} {workload:32s} checker {'on ' if checked else 'off'} "
                          f"{r['per_second']:8.1f} calls/s", file=sys.stderr)

    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Servers on: {'; '.join(names.values())}. {os.cpu_count()} CPUs, {platform.machine()}, "
          f"{args.clients} closed-loop clients (grpcio, Python {platform.python_version()}, same machine), "
          f"{rounds} round(s) of {seconds:.0f} s per configuration, load average at the end {load_avg:.1f}")
    print()
    print("Through the servers (best round; median of rounds in brackets):")
    print()
    print("| interpreter | workload | server | calls/s | speed-up vs 1 worker | p50 latency ms |")
    print("|---|---|---|---:|---:|---:|")
    rows = []
    for name in names.values():
        for workload in ("numpy (releases the GIL)", "pure Python (holds the GIL)"):
            base = best(server_runs[(name, workload, "threaded --max-workers 1")])["per_second"]
            for mode, label, _ in configs:
                b = best(server_runs[(name, workload, f"{mode} {label}")])
                rows.append({"interpreter": name, "workload": workload, "server": f"{mode} {label}", **b})
                print(f"| {name} | {workload} | {mode} {label} | {b['per_second']:.1f} "
                      f"({b['median_per_second']:.1f}) | {b['per_second'] / base:.2f}x | {b['p50_ms']:.1f} |")
    print()
    print("Without gRPC, the adapter method called from plain threads of one process, and from two")
    print("single-threaded processes at once (what the machine allows):")
    print()
    print("| interpreter | workload | callers | calls/s | speed-up vs 1 thread |")
    print("|---|---|---|---:|---:|")
    local_rows = []
    for name in names.values():
        for workload in ("numpy (releases the GIL)", "pure Python (holds the GIL)"):
            base = best(local_runs[(name, workload, 1)])["per_second"]
            for threads in (1, 2, 4, "2 processes"):
                b = best(local_runs[(name, workload, threads)])
                local_rows.append({"interpreter": name, "workload": workload, "threads": threads, **b})
                label = threads if isinstance(threads, str) else f"{threads} thread{'s' if threads > 1 else ''}"
                print(f"| {name} | {workload} | {label} | {b['per_second']:.1f} | {b['per_second'] / base:.2f}x |")
    print()
    print("| interpreter | workload | threaded, 4 workers | calls/s | relative to checker off |")
    print("|---|---|---|---:|---:|")
    check_rows = []
    for name in names.values():
        for workload in WORKLOADS:
            off = best(check_runs[(name, workload, False)])["per_second"]
            for checked in (False, True):
                b = best(check_runs[(name, workload, checked)])
                check_rows.append({"interpreter": name, "workload": workload, "checker": checked, **b})
                print(f"| {name} | {workload} | --thread-safety-check {'on' if checked else 'off'} | "
                      f"{b['per_second']:.1f} | {b['per_second'] / off:.2f} |")
    errors = [e for runs in list(server_runs.values()) + list(check_runs.values()) for r in runs for e in r["errors"]]
    findings = [r.get("findings", 0) for runs in check_runs.values() for r in runs]
    if any(findings):
        print("\nthe checker reported findings on ThreadedShowcaseAdapter:", findings)
    if errors:
        print("\nerrors:", errors[:5])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"servers": rows, "in_process": local_rows, "checker": check_rows, "interpreters": names,
                       "cpus": os.cpu_count(), "seconds": seconds, "rounds": rounds, "clients": args.clients},
                      fh, indent=2, default=str)
    return 1 if errors or any(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
