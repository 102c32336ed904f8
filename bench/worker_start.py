#!/usr/bin/env python3
"""Worker start-up: how long from the request for a worker to its ready line, started fresh (today's
path) or forked by the fork server (`--fork-server`).

    python3 bench/worker_start.py                  # 5 rounds of each, about 30 s on 2 cores
    python3 bench/worker_start.py --quick          # 2 rounds: does it run
    python3 bench/worker_start.py --rounds 10 --pool 16 --adapter my_adapters.Model

In one run, for one worker and for a pool of --pool workers requested at once (time until the last
one is ready):

- fresh: `python grpc_server_process.py --port 0 --exit-on-stdin-eof` with a fresh
  $SNAKEPIT_READY_NONCE, as the Elixir pool starts a worker: from Popen to the stdout line
  `SNAKEPIT_READY port=<p> pid=<pid> nonce=<that nonce>`;
- forked: one fork server started beforehand (its own start-up is shown on a line of its own), then
  `spawn <id> {"args": ["--port", "0"], "nonce": ...}` lines: from writing them to the event
  `<id> out SNAKEPIT_READY ... nonce=...`.

Each started worker is stopped (stdin closed, or `signal <id> SIGTERM`) and reaped before the next
round, so rounds do not overlap. The two kinds take turns round after round, so load from elsewhere
falls on both alike; the load average is printed before and after. Every wait is bounded (--timeout).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "grpc_server_process.py")
SHOWCASE = "snakepit_bridge.adapters.showcase.ShowcaseAdapter"


class Timeout(RuntimeError):
    pass


def start_fresh(count: int, adapter: str, timeout: float) -> float:
    """Start `count` workers at once; seconds until the last is ready. Stops them before returning."""
    started = time.perf_counter()
    workers = []
    for _ in range(count):
        nonce = secrets.token_hex(16)
        process = subprocess.Popen([sys.executable, SCRIPT, "--port", "0", "--exit-on-stdin-eof", "--adapter", adapter],
                                   cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "SNAKEPIT_READY_NONCE": nonce})
        ready = threading.Event()
        threading.Thread(target=watch_for_ready, args=(process.stdout, f"nonce={nonce}", ready), daemon=True).start()
        workers.append((process, ready))
    try:
        for process, ready in workers:
            if not ready.wait(max(0.0, started + timeout - time.perf_counter())):
                raise Timeout(f"a fresh worker was not ready within {timeout:.0f} s")
        return time.perf_counter() - started
    finally:
        for process, _ in workers:
            process.stdin.close()  # --exit-on-stdin-eof
        for process, _ in workers:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def watch_for_ready(stream, nonce_field: str, ready: threading.Event) -> None:
    for line in stream:
        if line.startswith(b"SNAKEPIT_READY ") and nonce_field.encode() in line:
            ready.set()
    stream.close()


class ForkServerClient:
    """One fork server, its events read by a thread: ready and exit times by id."""

    def __init__(self, adapter: str, timeout: float) -> None:
        self.timeout = timeout
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT, "--fork-server", "--exit-on-stdin-eof", "--adapter", adapter], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        first = self.process.stdout.readline()
        if not first.startswith(b"SNAKEPIT_FORKSERVER_READY"):
            raise RuntimeError(f"the fork server did not start: {first!r}")
        self.startup = time.perf_counter() - started
        self.changed = threading.Condition()
        self.ready: dict[str, str] = {}  # id -> nonce seen on its ready line
        self.exited: set[str] = set()
        self.error: str | None = None  # an error event: a request this script got wrong
        threading.Thread(target=self.read_events, daemon=True).start()

    def read_events(self) -> None:
        for raw in self.process.stdout:
            words = raw.decode("utf-8", "backslashreplace").rstrip("\n").split(" ")
            with self.changed:
                if len(words) >= 3 and words[1] == "out" and words[2] == "SNAKEPIT_READY":
                    self.ready[words[0]] = words[-1]
                elif len(words) >= 2 and words[1] == "exit":
                    self.exited.add(words[0])
                elif words[0] == "error":
                    self.error = " ".join(words)
                self.changed.notify_all()

    def wait(self, done, what: str) -> None:
        deadline = time.perf_counter() + self.timeout
        with self.changed:
            while not done():
                if self.error:
                    raise RuntimeError(self.error)
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise Timeout(f"{what} within {self.timeout:.0f} s")
                self.changed.wait(left)

    def start(self, count: int, round_index: int) -> float:
        """Request `count` workers in one write; seconds until the last is ready. Stops them afterwards."""
        ids = [f"r{round_index}w{index}" for index in range(count)]
        nonces = {id: secrets.token_hex(16) for id in ids}
        lines = "".join(f"spawn {id} {json.dumps({'args': ['--port', '0'], 'nonce': nonces[id]})}\n" for id in ids)
        started = time.perf_counter()
        self.process.stdin.write(lines.encode())
        self.process.stdin.flush()
        self.wait(lambda: all(self.ready.get(id) == f"nonce={nonces[id]}" for id in ids), "forked workers not ready")
        elapsed = time.perf_counter() - started
        self.process.stdin.write("".join(f"signal {id} SIGTERM\n" for id in ids).encode())
        self.process.stdin.flush()
        self.wait(lambda: all(id in self.exited for id in ids), "forked workers did not exit")
        return elapsed

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pool", type=int, default=8, help="workers requested at once (default: %(default)s)")
    parser.add_argument("--adapter", default=SHOWCASE)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any one wait may take")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds

    load_before = os.getloadavg()
    fork_server = ForkServerClient(args.adapter, args.timeout)
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for round_index in range(rounds):
            for count in (1, args.pool):
                times.setdefault(("fresh", count), []).append(start_fresh(count, args.adapter, args.timeout))
                times.setdefault(("forked", count), []).append(fork_server.start(count, round_index * 1000 + count))
    finally:
        fork_server.close()
    load_after = os.getloadavg()

    print(f"worker start-up, request -> ready line: {args.adapter}, process mode, {rounds} rounds; "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"fork server start-up (imports, once per pool): {fork_server.startup * 1000:.0f} ms")
    print()
    print("| workers | fresh median (min-max) ms | forked median (min-max) ms | fresh / forked |")
    print("|---|---|---|---|")
    for count in (1, args.pool):
        fresh, forked = times[("fresh", count)], times[("forked", count)]
        ratio = statistics.median(fresh) / statistics.median(forked)
        print(f"| {count} | {cell(fresh)} | {cell(forked)} | {ratio:.1f}x |")


def cell(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.0f} ({min(seconds) * 1000:.0f}-{max(seconds) * 1000:.0f})"


if __name__ == "__main__":
    main()
