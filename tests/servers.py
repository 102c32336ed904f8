"""Start real worker servers as subprocesses on 127.0.0.1 (or on a Unix socket, given --uds PATH) for
tests and benchmarks, and fork servers that fork workers on request (ForkServer).

    with WorkerServer("threaded", "--max-workers", "4") as server:
        client = server.client()
        assert client.execute("add", {"a": 1, "b": 2}) == 3
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import grpc

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"threaded": ROOT / "grpc_server_threaded.py", "process": ROOT / "grpc_server_process.py"}
READY = re.compile(r"^SNAKEPIT_READY (?:port=(?P<port>\d+)|uds=(?P<uds>\S+)) pid=(?P<pid>\d+)(?: nonce=\S+)?$")
SHOWCASE = "snakepit_bridge.adapters.showcase.ShowcaseAdapter"
SPEC_ADAPTER = "tests.adapters_for_tests.SpecAdapter"


class ServerFailedToStart(RuntimeError):
    pass


class ServerProcess:
    """What the test servers' subprocesses share: `with` starts one (`start()`) and, at the end, closes
    the clients it handed out, stops it gently (`stop_gently()`) and kills what is left."""

    process: subprocess.Popen | None
    _clients: list
    _readers: tuple[threading.Thread, ...] = ()  # the threads that read the process's stdout and stderr

    def start(self):
        raise NotImplementedError

    def _start_readers(self, *readers: Callable[[], None]) -> None:
        """Read the process's output in daemon threads (kept for `read_to_the_end`)."""
        self._readers = tuple(threading.Thread(target=reader, daemon=True) for reader in readers)
        for thread in self._readers:
            thread.start()

    def read_to_the_end(self, timeout: float = 5.0) -> None:
        """Wait until the output of the exited process has all been read (its readers see EOF), so that
        a test that looks at its last lines sees them. A child that still holds the pipes (a pre-forked
        worker) bounds the wait at `timeout` s."""
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))

    def stop_gently(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        for client in self._clients:
            client.close()
        try:
            if self.process is not None and self.process.poll() is None:
                self.stop_gently()
        finally:
            self.kill()


class WorkerServer(ServerProcess):
    """A worker server subprocess. Its stderr is collected in `self.stderr_lines`."""

    def __init__(self, mode: str = "threaded", *args: str, env: dict | None = None, startup_timeout: float = 30.0,
                 stdin_pipe: bool = True, python: str | None = None, umask: int = -1) -> None:
        self.mode = mode
        self.args = list(args)
        # PYTHONFAULTHANDLER: a server that does not exit when told to is sent SIGABRT (terminate()),
        # and writes every thread's stack to its stderr, which the failure then shows.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
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

    def stderr_match(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """The first match of `pattern` in the server's stderr, waiting for it up to `timeout` s: lines
        the server logged before its ready line may not have been read yet (another thread reads them)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.stderr_lines):
                if match := re.search(pattern, line):
                    return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in stderr:\n" + "\n".join(self.stderr_lines))
            time.sleep(0.02)

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

        self._start_readers(functools.partial(self._drain, self.process.stderr, self.stderr_lines), read_stdout)
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                self.read_to_the_end()
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
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # its threads' stacks to stderr (PYTHONFAULTHANDLER)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.kill()
            self.read_to_the_end()
            raise AssertionError(f"the server (pid {self.process.pid}) did not exit within {timeout} s of signal "
                                 f"{sig}; the end of its stderr, with its threads' stacks at SIGABRT:\n"
                                 + "\n".join(self.stderr_lines[-120:])) from None
        self.read_to_the_end()
        return returncode

    def stop_gently(self) -> None:
        self.terminate(timeout=20)


FORKSERVER_READY = re.compile(r"^SNAKEPIT_FORKSERVER_READY pid=(?P<pid>\d+)(?: nonce=(?P<nonce>\S+))?$")


class ForkServer(ServerProcess):
    """A fork server subprocess (`--fork-server`, snakepit_bridge/server/forkserver.py) and its events.

        with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
            worker = fork_server.spawn("w1", "--port", "0")   # waits for the worker's ready line
            worker.client().ping()

    Every stdout line is kept in `self.lines`; `self.events` holds them split as (first word, second
    word, rest): (id, "spawned" | "out" | "err" | "exit", text) or ("error", id, message).
    """

    def __init__(self, mode: str = "process", *args: str, env: dict | None = None,
                 startup_timeout: float = 30.0, transport: str | None = None, expect_ready: bool = True) -> None:
        self.mode = mode
        self.expect_ready = expect_ready  # False: a test of start-up failure reads the lines itself
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.python = os.environ.get("SNAKEPIT_TEST_SERVER_PYTHON") or sys.executable
        self.transport = transport or os.environ.get("SNAKEPIT_TEST_TRANSPORT")
        self.process: subprocess.Popen | None = None
        self.pid = 0
        self.lines: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.stderr_lines: list[str] = []
        self.changed = threading.Condition()
        self.stdout_closed = False
        self._clients: list = []

    def command(self) -> list[str]:
        args = self.args
        if self.transport and not any(arg.startswith("--transport") for arg in args):
            args = [*args, "--transport", self.transport]
        return [self.python, str(SCRIPTS[self.mode]), "--fork-server", *args]

    def start(self) -> "ForkServer":
        self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._start_readers(self._read_stdout, self._read_stderr)
        if self.expect_ready:
            ready = self.wait_line(lambda line: FORKSERVER_READY.match(line), self.startup_timeout)
            if ready is None:
                self.kill()
                raise ServerFailedToStart(f"{' '.join(self.command())}: no SNAKEPIT_FORKSERVER_READY line; stdout: "
                                          f"{self.lines}; stderr:\n" + "\n".join(self.stderr_lines[-30:]))
            self.pid = int(FORKSERVER_READY.match(ready)["pid"])
        return self

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "backslashreplace").removesuffix("\n")
            words = line.split(" ", 2)
            with self.changed:
                self.lines.append(line)
                if len(words) >= 2:
                    self.events.append((words[0], words[1], words[2] if len(words) > 2 else ""))
                self.changed.notify_all()
        with self.changed:
            self.stdout_closed = True
            self.changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "backslashreplace").rstrip("\n"))

    def wait_line(self, predicate, timeout: float = 10.0):
        """The first stdout line that satisfies `predicate`, or None after `timeout` s (or at stdout's end)."""
        return self._wait(lambda: next((line for line in self.lines if predicate(line)), None), timeout)

    def wait_event(self, predicate, timeout: float = 10.0, since: int = 0):
        """The first event (a, b, rest) from index `since` on that satisfies `predicate`, or None after
        `timeout` s."""
        return self._wait(lambda: next((e for e in self.events[since:] if predicate(e)), None), timeout)

    def last_spawned(self, id: str) -> int:
        """The index of the latest `<id> spawned` event (ids are reused once a child exited), else 0."""
        with self.changed:
            found = [index for index, e in enumerate(self.events) if e[0] == id and e[1] == "spawned"]
        return found[-1] if found else 0

    def _wait(self, find, timeout: float):
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = find()
                if found is not None or self.stdout_closed:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)

    def events_of(self, id: str) -> list[tuple[str, str]]:
        with self.changed:
            return [(kind, text) for first, kind, text in self.events if first == id]

    def request(self, line: str | bytes) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line if isinstance(line, bytes) else line.encode() + b"\n")
        self.process.stdin.flush()

    def request_spawn(self, id: str, *args: str, env: dict | None = None, nonce: str | None = None) -> None:
        spec: dict = {"args": list(args)}
        if env:
            spec["env"] = env
        if nonce:
            spec["nonce"] = nonce
        self.request(f"spawn {id} {json.dumps(spec)}")

    def spawn(self, id: str, *args: str, env: dict | None = None, nonce: str | None = None,
              timeout: float = 30.0) -> "ForkedWorker":
        """Request a worker and wait for its ready line (ServerFailedToStart if it exits first)."""
        if not args:
            args = ("--port", "0")
        since = len(self.events)
        self.request_spawn(id, *args, env=env, nonce=nonce)
        return self.wait_ready(id, timeout, since)

    def wait_ready(self, id: str, timeout: float = 30.0, since: int = 0) -> "ForkedWorker":
        found = self.wait_event(lambda e: e[0] == id and (e[1] == "exit" or (e[1] == "out" and READY.match(e[2])))
                                or (e[0] == "error" and e[1] == id), timeout, since)
        if found is None or found[1] != "out":
            raise ServerFailedToStart(f"{id} did not get ready: {found}; its events: {self.events_of(id)}")
        match = READY.match(found[2])
        assert match is not None
        spawned = self.wait_event(lambda e: e[0] == id and e[1] == "spawned", 0, since)
        assert spawned is not None, self.events_of(id)
        worker = ForkedWorker(self, id, int(spawned[2]), int(match["port"] or 0), match["uds"], found[2])
        return worker

    def wait_exit(self, id: str, timeout: float = 10.0) -> int | None:
        """The exit code of the latest child with this id, once its exit event came (None after `timeout` s)."""
        found = self.wait_event(lambda e: e[0] == id and e[1] == "exit", timeout, self.last_spawned(id))
        return None if found is None else int(found[2])

    def close_stdin(self) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.close()

    def stop_gently(self) -> None:
        """Stdin's end stops the fork server (and its children) in order."""
        assert self.process is not None
        with contextlib.suppress(OSError, ValueError):
            self.close_stdin()
        self.process.wait(20)


class ForkedWorker:
    """A worker that a ForkServer forked, once it printed its ready line."""

    def __init__(self, fork_server: ForkServer, id: str, pid: int, port: int, uds: str | None, ready_line: str):
        self.fork_server = fork_server
        self.id = id
        self.pid = pid
        self.port = port
        self.uds = uds
        self.ready_line = ready_line

    @property
    def address(self) -> str:
        return f"unix:{self.uds}" if self.uds else f"127.0.0.1:{self.port}"

    def client(self, **kwargs):
        from snakepit_bridge.client import BridgeClient

        client = BridgeClient(self.address, **kwargs)
        self.fork_server._clients.append(client)
        return client


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Whether `predicate()` became true within `timeout` s (asked every `interval` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def pid_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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


# --- TLS: a throwaway PKI and grpcurl over TLS ----------------------------------------------------

class TestPki:
    """PEM files made by `make_test_pki` in one directory: `ca`, `server`/`server_key` (localhost,
    127.0.0.1), `client`/`client_key` (signed by `ca`), `wrong_name`/`wrong_name_key` (signed by `ca`,
    for wrong.example only) and `other_ca` (a CA that signed none of them)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __getattr__(self, name: str) -> str:
        stem = name.replace("_key", "-key").replace("_", "-")
        path = self.directory / f"{stem}.pem"
        if not path.exists():
            raise AttributeError(name)
        return str(path)

    def server_flags(self, *, mtls: bool = False) -> list[str]:
        flags = ["--tls-cert", self.server, "--tls-key", self.server_key]
        return flags + ["--tls-client-ca", self.ca] if mtls else flags


def make_test_pki(directory: Path) -> TestPki:
    """A CA and the certificates of TestPki, with openssl (EC P-256 keys: quick to make), in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    def new_ca(name: str, subject: str) -> None:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                "-subj", f"/CN={subject}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", f"{name}-key.pem", "-out", f"{name}.pem")

    def signed(name: str, subject: str, extensions: str) -> None:
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={subject}",
                "-keyout", f"{name}-key.pem", "-out", f"{name}.csr")
        (directory / f"{name}.ext").write_text(extensions + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")

    new_ca("ca", "snakepit test CA")
    new_ca("other-ca", "some other CA")
    signed("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    signed("client", "snakepit test client", "extendedKeyUsage=clientAuth")
    signed("wrong-name", "wrong.example", "subjectAltName=DNS:wrong.example\nextendedKeyUsage=serverAuth")
    return TestPki(directory)


def run_grpcurl_tls(address: str, *args: str, cacert: str, cert: str | None = None, key: str | None = None,
                    data: str | None = None, headers: dict | None = None, timeout: float = 30.0
                    ) -> subprocess.CompletedProcess:
    """`grpcurl -cacert CA [-cert C -key K] [-H 'k: v'] [-d data] address args...` against a TLS server."""
    command = ["grpcurl", "-max-time", str(int(timeout)), "-cacert", cacert]
    if cert is not None:
        command += ["-cert", cert, "-key", key or ""]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if data is not None:
        command += ["-d", data]
    return subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=timeout + 10)
