"""Serve one adapter with the real threaded server and call it from many client threads at once."""
from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

from tests.servers import WorkerServer


@dataclass
class Run:
    report: dict                 # the JSON written by --thread-safety-report at shutdown
    live_report: dict            # GetStats.thread_safety_json while serving
    adapter_stats: dict          # GetStats.adapter_stats_json
    results: list = field(default_factory=list)
    errors: list = field(default_factory=list)   # BridgeCallError of failed calls
    stderr: list = field(default_factory=list)
    exit_code: int = 0
    final: object = None         # what the ``final`` call returned (after every other call)

    def findings(self, kind: str | None = None) -> list[dict]:
        return [f for f in self.report["findings"] if kind is None or f["kind"] == kind]


def exercise(adapter: str, calls: list[tuple[str, dict]], *, clients: int = 8, rounds: int = 12,
             max_workers: int = 8, extra_args: tuple = (), env: dict | None = None,
             final: tuple[str, dict] | None = None) -> Run:
    """Start ``grpc_server_threaded.py --adapter ADAPTER --thread-safety-check`` on 127.0.0.1, make
    ``rounds`` passes over ``calls`` from ``clients`` threads at once, then the ``final`` call (the
    adapter's state, to check its invariant), read GetStats, SIGTERM it and read the report file."""
    from snakepit_bridge.client import BridgeCallError

    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "thread-safety.json")
        server = WorkerServer("threaded", "--adapter", adapter, "--max-workers", str(max_workers),
                              "--thread-safety-check", "--thread-safety-report", report_path,
                              *extra_args, env=env)
        with server:
            client = server.client()
            jobs = [call for _ in range(rounds) for call in calls]
            results, errors = [], []

            def run(job):
                tool_name, args = job
                try:
                    results.append(client.execute(tool_name, args))
                except BridgeCallError as exc:
                    errors.append(exc)

            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                list(pool.map(run, jobs))
            final_result = client.execute(*final) if final is not None else None
            stats = client.stats()
            live = json.loads(stats.thread_safety_json)
            adapter_stats = json.loads(stats.adapter_stats_json) if stats.adapter_stats_json else {}
            exit_code = server.terminate()
            deadline = time.monotonic() + 5
            while not any(line.endswith("stopped") for line in server.stderr_lines) and \
                    time.monotonic() < deadline:
                time.sleep(0.02)   # let the stderr reader reach the end of the log
        with open(report_path, encoding="utf-8") as fh:
            report = json.load(fh)
        return Run(report, live, adapter_stats, results, errors, list(server.stderr_lines), exit_code,
                   final_result)
