"""Large arrays to a tool and back: inline in gRPC messages vs shared-memory regions (`--shm-dir`),
side by side with a plain TCP loopback echo and a memory copy, in one run.

    python3 bench/array_roundtrip.py                  # 1, 16 and 64 MB float64, 7 rounds
    python3 bench/array_roundtrip.py --sizes-mb 16 --rounds 3

One threaded server (showcase adapter, `echo` returns its arguments) serves both client paths; the
TCP echo is a separate Python process that sends back every byte it reads (the floor any socket path
pays: two copies through the kernel each way). Each round runs every path once, interleaved, so all
see the same machine; the table shows the median round trip and its range over the rounds, MB/s as
payload / round trip, and each path against the TCP echo of the same size measured in the same run.

Not measured here: the Elixir client (bench/elixir_client.exs), many calls at once, remote hosts
(regions need the same host; remote callers always go inline).
"""
from __future__ import annotations

import argparse
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


def timed(fn, array: np.ndarray) -> float:
    start = time.perf_counter()
    result = fn(array)
    elapsed = time.perf_counter() - start
    if result.shape != array.shape or result[-1] != array[-1]:
        raise AssertionError("wrong result")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=240, help="stop starting rounds after this long")
    args = parser.parse_args()

    load_before = os.getloadavg()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    shm_dir = tempfile.mkdtemp(prefix="snakepit-bench-", dir=base)
    echo = TcpEcho()
    server = WorkerServer("threaded", "--shm-dir", shm_dir, "--max-workers", "4").start()
    inline = BridgeClient(server.address, max_message_mb=256)
    shared = BridgeClient(server.address, shm_dir=shm_dir)
    paths = {
        "numpy copy (memcpy)": lambda a: a.copy(),
        "TCP loopback echo (plain Python sockets)": echo.round_trip,
        "Python client, inline": lambda a: inline.execute("echo", {"x": a})["x"],
        "Python client, shared memory": lambda a: shared.execute("echo", {"x": a})["x"],
    }
    rows = []
    started = time.monotonic()
    try:
        for size_mb in args.sizes_mb:
            array = np.random.default_rng(1).random(int(size_mb * 1e6) // 8)
            for fn in paths.values():
                timed(fn, array)  # warm-up: connections, first page faults of the server's buffers
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    samples[name].append(timed(fn, array))
                if time.monotonic() - started > args.max_seconds:
                    break
            rows.append((size_mb, samples))
        server_rss_peak = proc_status_mb(server.pid, "VmHWM")
    finally:
        inline.close()
        shared.close()
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
            print(f"| {size_mb:g} MB | {name} | {median * 1e3:.1f} ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}) "
                  f"| {size_mb / median:,.0f} | {echo_median / median:.2f}x |")
    print()
    print(f"{len(rows[0][1][next(iter(paths))]) if rows else 0} rounds per size. Server peak RSS over the whole run "
          f"(VmHWM): {server_rss_peak:.0f} MB. Regions left in the directory after the run: {len(leftover)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
