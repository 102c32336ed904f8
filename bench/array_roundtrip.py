"""Large arrays to a tool and back: inline in gRPC messages vs shared-memory regions (`--shm-dir`),
side by side with a plain TCP loopback echo and a memory copy, in one run.

    python3 bench/array_roundtrip.py                  # 1, 16 and 64 MB float64, 7 rounds
    python3 bench/array_roundtrip.py --sizes-mb 16 --rounds 3
    python3 bench/array_roundtrip.py --elixir         # and the Elixir client's rows (needs mix)

One threaded server (showcase adapter, `echo` returns its arguments) serves both client paths; the
TCP echo is a separate Python process that sends back every byte it reads (the floor any socket path
pays: two copies through the kernel each way). Each round runs every path once, interleaved, so all
see the same machine; the table shows the median round trip and its range over the rounds, MB/s as
payload / round trip, and each path against the TCP echo of the same size measured in the same run.

With --elixir, the Elixir client's rows come from bench/elixir_array_roundtrip.exs (`mix run` in
elixir_client/, with the BEAM's schedulers told not to busy-wait): two pools of one threaded worker
each, `shm: false` (inline) and `shm: true`, timing `Snakepit.execute(pool, "echo", %{x: array})`
for an NDArray of the same size, one round trip per request from this script, so that its paths are
interleaved with the others round by round.

Not measured here: many calls at once, remote hosts (regions need the same host; remote callers
always go inline).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snakepit_bridge.client import BridgeClient  # noqa: E402
from tests.servers import WorkerServer, proc_status_mb  # noqa: E402

ECHO_SERVER = r"""
import socket, sys, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0)); listener.listen(4)
print(listener.getsockname()[1], flush=True)
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    while True:
        n = conn.recv_into(buffer)
        if not n:
            return
        conn.sendall(view[:n])
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class TcpEcho:
    """A plain-socket echo server in its own process, and one connection to it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
        port = int(self.process.stdout.readline())
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(self, array: np.ndarray) -> np.ndarray:
        out = np.empty_like(array)
        sender = threading.Thread(target=self.conn.sendall, args=(memoryview(array).cast("B"),))
        sender.start()  # the echo comes back while we still send: read it at the same time
        view, got = memoryview(out).cast("B"), 0
        while got < len(view):
            got += self.conn.recv_into(view[got:])
        sender.join()
        return out

    def close(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.wait()


class ElixirClient:
    """bench/elixir_array_roundtrip.exs in a BEAM of its own: one timed Elixir round trip per call."""

    def __init__(self) -> None:
        env = {**os.environ, "SNAKEPIT_PYTHON": sys.executable,
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               # schedulers that busy-wait take the CPUs the workers and this script need
               "ELIXIR_ERL_OPTIONS": "+sbwt none +sbwtdcpu none +sbwtdio none"}
        self.process = subprocess.Popen(["mix", "run", "../bench/elixir_array_roundtrip.exs"],
                                        cwd=ROOT / "elixir_client", env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self._reply()  # {"ready": true}, once both pools are up (after mix compiled, the first time)

    def _reply(self) -> dict:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):  # mix may print other lines first (compiling)
                return json.loads(line)
        raise RuntimeError(f"the Elixir bench exited with {self.process.wait()}")

    def round_trip(self, path: str, size_mb: float) -> float:
        """Seconds of one `Snakepit.execute(pool, "echo", %{x: array})`, as the BEAM timed it."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"path": path, "size_mb": size_mb}) + "\n")
        self.process.stdin.flush()
        return float(self._reply()["seconds"])

    def close(self) -> int | None:
        """Stop it; the regions left in its shared-memory pool's directory (None if it did not say)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            left = self._reply().get("regions_left")
            self.process.wait(timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            left = None
            self.process.kill()
            self.process.wait()
        return left


def timed(fn, array: np.ndarray) -> float:
    start = time.perf_counter()
    result = fn(array)
    elapsed = time.perf_counter() - start
    if result.shape != array.shape or result[-1] != array[-1]:
        raise AssertionError("wrong result")
    return elapsed


def peak_memory(size_mb: float) -> None:
    """The worker's peak memory for one inline round trip of `size_mb`, on each transport: a fresh
    server, one small call, then the large one; VmHWM before and after."""
    array = np.random.default_rng(1).random(int(size_mb * 1e6) // 8)
    print(f"| transport | {size_mb:g} MB inline echo, ms | worker peak RSS before | after | growth / payload |")
    print("|---|---:|---:|---:|---:|")
    for transport in ("grpcio", "grpclib"):
        with WorkerServer("threaded", "--transport", transport, "--max-message-mb", "256") as server:
            client = BridgeClient(server.address, max_message_mb=256)
            client.execute("echo", {"x": np.zeros(10)})
            before = proc_status_mb(server.pid, "VmHWM")
            started = time.perf_counter()
            client.execute("echo", {"x": array})
            elapsed = time.perf_counter() - started
            after = proc_status_mb(server.pid, "VmHWM")
            client.close()
        print(f"| {transport} | {elapsed * 1e3:.0f} | {before:.0f} MB | {after:.0f} MB | "
              f"{(after - before) / (array.nbytes / 2 ** 20):.1f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=240, help="stop starting rounds after this long")
    parser.add_argument("--elixir", action="store_true",
                        help="add the Elixir client's rows, inline and shared memory (mix run in elixir_client/)")
    parser.add_argument("--peak-memory-mb", type=float, default=None,
                        help="only measure the worker's peak memory for one inline round trip of this size")
    args = parser.parse_args()
    if args.peak_memory_mb is not None:
        peak_memory(args.peak_memory_mb)
        return 0

    load_before = os.getloadavg()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    shm_dir = tempfile.mkdtemp(prefix="snakepit-bench-", dir=base)
    echo = TcpEcho()
    server = WorkerServer("threaded", "--shm-dir", shm_dir, "--max-workers", "4").start()
    inline = BridgeClient(server.address, max_message_mb=256)
    shared = BridgeClient(server.address, shm_dir=shm_dir)
    elixir = ElixirClient() if args.elixir else None
    # each path: (array, size in MB) -> seconds of one round trip
    paths = {
        "numpy copy (memcpy)": lambda a, _mb: timed(lambda a: a.copy(), a),
        "TCP loopback echo (plain Python sockets)": lambda a, _mb: timed(echo.round_trip, a),
        "Python client, inline": lambda a, _mb: timed(lambda a: inline.execute("echo", {"x": a})["x"], a),
        "Python client, shared memory": lambda a, _mb: timed(lambda a: shared.execute("echo", {"x": a})["x"], a),
    }
    if elixir is not None:
        paths["Elixir client, inline"] = lambda _a, mb: elixir.round_trip("inline", mb)
        paths["Elixir client, shared memory"] = lambda _a, mb: elixir.round_trip("shm", mb)
    rows = []
    elixir_left = None
    started = time.monotonic()
    try:
        for size_mb in args.sizes_mb:
            array = np.random.default_rng(1).random(int(size_mb * 1e6) // 8)
            for fn in paths.values():
                fn(array, size_mb)  # warm-up: connections, first page faults of the server's buffers
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    samples[name].append(fn(array, size_mb))
                if time.monotonic() - started > args.max_seconds:
                    break
            rows.append((size_mb, samples))
        server_rss_peak = proc_status_mb(server.pid, "VmHWM")
    finally:
        inline.close()
        shared.close()
        if elixir is not None:
            elixir_left = elixir.close()
        server.terminate()
        echo.close()
        leftover = os.listdir(shm_dir)
        shutil.rmtree(shm_dir, ignore_errors=True)
    load_after = os.getloadavg()

    print(f"Python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          f"load average (1, 5, 15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; regions in {base}")
    print()
    print("| size | path | round trip ms (median, min-max) | MB/s | vs TCP echo |")
    print("|---:|---|---:|---:|---:|")
    for size_mb, samples in rows:
        echo_median = statistics.median(samples["TCP loopback echo (plain Python sockets)"])
        for name, values in samples.items():
            median = statistics.median(values)
            digits = 1 if median >= 1e-3 else 3  # small calls: tenths of a millisecond would hide their differences
            print(f"| {size_mb:g} MB | {name} | {median * 1e3:.{digits}f} ({min(values) * 1e3:.{digits}f}-"
                  f"{max(values) * 1e3:.{digits}f}) "
                  f"| {size_mb / median:,.0f} | {echo_median / median:.2f}x |")
    print()
    print(f"{len(rows[0][1][next(iter(paths))]) if rows else 0} rounds per size. Server peak RSS over the whole run "
          f"(VmHWM): {server_rss_peak:.0f} MB. Regions left in the directory after the run: {len(leftover)}"
          + (f"; in the Elixir pool's: {elixir_left}." if args.elixir else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
