"""Long fuzz run against real worker servers (the suite's `tests/test_server_fuzz.py` is the bounded one).

    .venv/bin/python bench/fuzz.py --count 20000 --seed 1

For each server mode: mutated ExecuteTool / ExecuteBatch / InitializeSession requests (see
tests/fuzz_requests.py), then a table of statuses, the slowest call, server RSS growth and CPU, and
whether any answer blamed the server (UNKNOWN/INTERNAL). Exits 1 if any did, or a call took over 2 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fuzz_requests import run  # noqa: E402
from tests.servers import SPEC_ADAPTER, WorkerServer, cpu_seconds, proc_status_mb as proc_status  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", default="threaded,process")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    failed = False
    for mode in args.modes.split(","):
        with WorkerServer(mode, "--adapter", SPEC_ADAPTER) as server:
            run(server.address, 50, args.seed + 1)  # warm-up
            rss_before, cpu_before, started = proc_status(server.pid, "VmRSS"), cpu_seconds(server.pid), time.monotonic()
            report = run(server.address, args.count, args.seed)
            wall = time.monotonic() - started
            rss_after, hwm = proc_status(server.pid, "VmRSS"), proc_status(server.pid, "VmHWM")
            cpu = cpu_seconds(server.pid) - cpu_before
            serving = server.client().execute("noop") is None and server.process.poll() is None
        print(f"\n## {mode} server: {report.calls} requests in {wall:.1f} s, seed {args.seed}\n")
        print(report.table())
        print(f"\n- slowest call: {report.slowest * 1000:.1f} ms; calls over 2 s: {len(report.slow)}")
        print(f"- server faults (UNKNOWN/INTERNAL): {len(report.server_faults)} {report.server_faults[:5]}")
        print(f"- server RSS: {rss_before:.0f} -> {rss_after:.0f} MB (growth {rss_after - rss_before:+.1f} MB), peak {hwm:.0f} MB")
        print(f"- server CPU: {cpu:.1f} s ({cpu / max(1, report.calls) * 1e6:.0f} us per request)")
        print(f"- still serving afterwards: {serving}")
        failed |= bool(report.server_faults or report.slow or not serving)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("not measured: streaming calls (ExecuteStreamingTool), authenticated servers, concurrent fuzzing clients")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
