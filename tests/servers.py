"""Start real worker servers as subprocesses on 127.0.0.1 (or on a Unix socket, given --uds PATH) for
tests and benchmarks.

    with WorkerServer("threaded", "--max-workers", "4") as server:
        client = server.client()
        assert client.execute("add", {"a": 1, "b": 2}) == 3
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"threaded": ROOT / "grpc_server_threaded.py", "process": ROOT / "grpc_server_process.py"}
READY = re.compile(r"^SNAKEPIT_READY (?:port=(?P<port>\d+)|uds=(?P<uds>\S+)) pid=(?P<pid>\d+)(?: nonce=\S+)?$")
SHOWCASE = "snakepit_bridge.adapters.showcase.ShowcaseAdapter"
SPEC_ADAPTER = "tests.adapters_for_tests.SpecAdapter"


class ServerFailedToStart(RuntimeError):
    pass


class WorkerServer:
    """A worker server subprocess. Its stderr is collected in `self.stderr_lines`."""

    def __init__(self, mode: str = "threaded", *args: str, env: dict | None = None, startup_timeout: float = 30.0,
                 stdin_pipe: bool = True, python: str | None = None, umask: int = -1) -> None:
        self.mode = mode
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.stdin_pipe = stdin_pipe
        self.umask = umask  # the server process's umask (-1: this process's)
        # The whole suite can run against another transport or interpreter (the free-threaded subset):
        # SNAKEPIT_TEST_TRANSPORT=grpclib, SNAKEPIT_TEST_SERVER_PYTHON=.venv-ft/bin/python.
        self.python = python or os.environ.get("SNAKEPIT_TEST_SERVER_PYTHON") or sys.executable
        self.transport = os.environ.get("SNAKEPIT_TEST_TRANSPORT")
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.uds: str | None = None  # the socket's path, when it serves one (from its ready line)
        self.pid = 0
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._clients = []

    @property
    def address(self) -> str:
        """The grpc target: `127.0.0.1:<port>`, or `unix:<path>`."""
        return f"unix:{self.uds}" if self.uds else f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = self.args
        on_unix_socket = "--uds" in args or any(arg.startswith("unix:") for arg in args)
        if "--port" not in args and not on_unix_socket:
            args = ["--port", "0", *args]
        if "--host" not in args and not on_unix_socket:
            args = ["--host", "127.0.0.1", *args]
        if self.transport and not any(arg.startswith("--transport") for arg in args):
            args = [*args, "--transport", self.transport]
        return [self.python, str(SCRIPTS[self.mode]), *args]

    def start(self) -> "WorkerServer":
        self.process = subprocess.Popen(
            self.command(), cwd=ROOT, env=self.env, text=True, bufsize=1,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, umask=self.umask)
        threading.Thread(target=self._drain, args=(self.process.stderr, self.stderr_lines), daemon=True).start()
        ready = threading.Event()

        def read_stdout():
            for line in self.process.stdout:
                line = line.rstrip("\n")
                self.stdout_lines.append(line)
                match = READY.match(line)
                if match and not ready.is_set():
                    self.port, self.uds = int(match["port"] or 0), match["uds"]
                    self.pid = int(match["pid"])
                    ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                time.sleep(0.1)
                raise ServerFailedToStart(
                    f"{' '.join(self.command())} exited with {self.process.returncode} before SNAKEPIT_READY:\n"
                    + "\n".join(self.stderr_lines[-30:]))
        return self

    @staticmethod
    def _drain(stream, sink):
        for line in stream:
            sink.append(line.rstrip("\n"))

    def client(self, **kwargs):
        from snakepit_bridge.client import BridgeClient

        client = BridgeClient(self.address, **kwargs)
        self._clients.append(client)
        return client

    def channel(self, *options: tuple) -> "grpc.Channel":
        """A raw grpc channel to the server (closed with the server). `grpc.use_local_subchannel_pool`
        among the options gives it its own TCP connection."""
        import grpc

        channel = grpc.insecure_channel(self.address, options=list(options))
        self._clients.append(channel)
        return channel

    def stub(self, *options: tuple):
        """A raw BridgeServiceStub over a fresh channel, for checks below the BridgeClient."""
        from snakepit_bridge.generated import snakepit_bridge_pb2_grpc as pb_grpc

        return pb_grpc.BridgeServiceStub(self.channel(*options))

    def grpcurl(self, *args: str, data: str | None = None, headers: dict | None = None, flags: tuple | list = (),
                timeout: float = 30.0):
        """Run the real grpcurl binary against the server (plaintext, reflection): returns CompletedProcess."""
        return run_grpcurl(self.address, *args, data=data, headers=headers, flags=flags, timeout=timeout)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> "WorkerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        for client in self._clients:
            client.close()
        try:
            if self.process is not None and self.process.poll() is None:
                self.terminate(timeout=20)
        finally:
            self.kill()


def proc_status_mb(pid: int, key: str) -> float:
    """A memory figure of /proc/PID/status in MB: "VmRSS" (now) or "VmHWM" (peak)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {key} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_grpcurl(address: str, *args: str, data: str | None = None, headers: dict | None = None,
                flags: tuple | list = (), timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`grpcurl -plaintext [flags] [-H 'k: v'] [-d data] address args...`, e.g. args ("list",),
    ("describe", "snakepit.bridge.BridgeService") or ("snakepit.bridge.BridgeService/Ping",). A failed
    call exits with 64 + the gRPC status code. An address `unix:<path>` is called as `-unix <path>`."""
    command = ["grpcurl", "-plaintext", "-max-time", str(int(timeout)), *flags]
    for key, value in (headers or {}).items():
        command += ["-H", f"{key}: {value}"]
    if data is not None:
        command += ["-d", data]
    if address.startswith("unix:"):
        command += ["-unix", address[len("unix:"):], *args]
    else:
        command += [address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout + 10)
