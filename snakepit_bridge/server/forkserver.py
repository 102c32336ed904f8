"""The fork server: one long-lived process per pool that imports the server, its transport and the
adapter's module once, then forks a worker on request, in milliseconds instead of an interpreter's
start-up and imports (hundreds of milliseconds; seconds with torch).

    python grpc_server_process.py  --fork-server [flags every worker gets]
    python grpc_server_threaded.py --fork-server [flags every worker gets]

The fork server itself serves no calls and never creates a grpc server or channel: grpc is not
fork-safe once its threads run, so each child builds its own server after fork, as `--processes`
does. A child is a worker like one the script starts: the same flags (the fork server's, then the
request's), the same ready line with the request's nonce, the same shutdown, the same exit codes.

Protocol (UTF-8 lines ending in "\\n"; the pool writes requests to stdin and reads events on stdout)

Start-up: once the imports are done the first line on stdout is

    SNAKEPIT_FORKSERVER_READY pid=<pid>                  (with $SNAKEPIT_READY_NONCE set:
                                                          an empty line, then the same line + " nonce=<n>")

or, when the fork server cannot start (an adapter module that fails to import, a missing package, a
preloaded setup() that raises), one line `error: <message>` and exit code 1. Flags that do not parse are
argparse's: usage on stderr, exit code 2.

Requests, one per line (blank lines are ignored; a line may have at most 1 MiB):

    spawn <id> <json>       fork a worker. <id>: 1-128 of A-Z a-z 0-9 _ . : @ / + = -, not "-" or
                            "error", unique among running children (reusable once its exit event came).
                            <json> (may be omitted, meaning {}): an object with the optional keys
                              "args":  ["--port", "0"]  flags appended to the fork server's (the later
                                       of a repeated flag wins), e.g. ["--uds", "/run/w3.sock"]
                              "env":   {"NAME": "value"}  set in the child before its setup() runs
                                       (after the fork server's imports: a variable that a library
                                       reads when it is imported, OMP_NUM_THREADS say, was read there)
                              "nonce": "<word>"  for the child's ready line (as $SNAKEPIT_READY_NONCE)
    signal <id> <SIGNAME>   send SIGTERM, SIGKILL, SIGINT, SIGUSR1, ... to a running child.

Events, one per line; the first word says what the line is:

    <id> spawned <pid>      the child is forked (always the first event of that id)
    <id> out <text>         one line the child printed on stdout, newline removed; <text> is every byte
    <id> err <text>           after the second space (it may be empty); a line over 16 KiB keeps its
                              first 16 KiB and ends in "...(N more bytes)". Its ready line arrives as
                              `<id> out SNAKEPIT_READY port=<p> pid=<pid> nonce=<n>`, its start-up
                              failure as `<id> err error: <message>` before its exit event.
    <id> exit <code>        the child was reaped: its exit code, or -<signal number> when a signal ended
                            it (-9: SIGKILL). It comes as soon as the child dies (SIGCHLD), after the
                            last of its output; the id is then free.
    error <id> <message>    a request that cannot be served (bad JSON, unknown flag, unknown or running
    error - <message>         id, a fork that failed); "-" when the line named no usable id. The fork
                              server keeps serving. A `spawn` is answered by `spawned` or by `error`;
                              a `signal` only by `error` when it fails (the exit event follows a signal
                              that ends the child).

Events of different children interleave; each one's events keep their order. Nothing else is ever
written to stdout (whatever the adapter prints in the fork server goes to stderr, where the fork
server's logs go); a pool that merges stderr into stdout must skip lines that are not events.

Stopping: stdin's end (the pool closed it, or the BEAM died: the kernel closes it either way), SIGTERM
or SIGINT stop the fork server: SIGTERM to every child, SIGKILL to those still alive 2 s later, their
exit events, then exit 0. For a drain longer than that, send `signal <id> SIGTERM` and wait for the
exit events before closing stdin. A child dies with the fork server (PR_SET_PDEATHSIG SIGKILL), so a
fork server killed -9 leaves no worker behind; its stdin is a pipe the fork server holds, so with
--exit-on-stdin-eof it also sees the fork server's exit as stdin EOF.

Setup: by default each child runs the adapter's setup() itself, after fork. Thread pools that OpenMP,
MKL, OpenBLAS or torch create while a model loads do not survive fork (a child gets their state but
not their threads, and can hang in its first parallel call), and CUDA cannot be initialised before
fork at all. An adapter whose setup() is fork-safe (plain Python and numpy data, read-only files) may
declare `__fork_preload__ = True`: setup() then runs once in the fork server before it is ready, every
child serves a copy-on-write copy of that instance (bind_server() runs again in each child), and
teardown() runs once, in the fork server, when it stops.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import selectors
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .forkserver_protocol import (
    BadRequest,
    LineSplitter,
    RequestReader,
    Signal,
    Spawn,
    error_event,
    event,
    parse_request,
    ready_line,
)
from .settings import Settings, parse_settings
from .transport import missing_transport_package

if TYPE_CHECKING:
    from ..contract.adapter import BaseAdapter

log = logging.getLogger("snakepit_bridge.server")

STOP_GRACE_SECONDS = 2.0  # SIGTERM to SIGKILL when the fork server stops (the pool's 5 s budget)
REAP_LIMIT_SECONDS = 5.0  # after SIGKILL: a child that still is not reaped (stuck in the kernel) is left
READ_CHUNK = 65536
DRAIN_READS = 64          # reads of a dead child's pipe at most (a grandchild may keep writing to it)


class EventWriter:
    """Writes whole event lines to the pool. A pool that stops reading blocks the fork server, which is
    the back-pressure children get from a full pipe of their own; a pool that is gone marks it broken."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def write(self, line: bytes) -> None:
        if self.broken:
            return
        view = memoryview(line + b"\n")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:  # EPIPE: nobody reads events any more
            self.broken = True


class CannotStart(Exception):
    """Why the fork server cannot start: its one `error: <message>` line."""


@dataclass
class Child:
    id: str
    pid: int
    stdin: int  # the write end of the child's stdin, held open and never written
    streams: dict[int, tuple[str, LineSplitter]] = field(default_factory=dict)  # read fd -> (out|err, splitter)


def serve_fork_server(settings: Settings, argv: list[str], ready_nonce: str | None) -> int:
    events = EventWriter(take_stdout())
    requests = take_stdin()
    try:
        preloaded = preload(settings)
    except CannotStart as exc:
        events.write(f"error: {exc}".encode("utf-8", "backslashreplace"))
        return 1
    server = ForkServer(settings, argv, events, requests, preloaded)
    events.write(ready_line(os.getpid(), ready_nonce))
    log.info("fork server ready: %s workers of %s%s", settings.mode.name, settings.args.adapter,
             " (setup() ran here, once)" if preloaded is not None else "")
    try:
        return server.run()
    finally:
        server.close()
        if preloaded is not None:
            from .worker import teardown_adapter

            teardown_adapter(preloaded)


def take_stdout() -> int:
    """A private copy of stdout for events; fd 1 then points at stderr, so that nothing else (an adapter
    printing while its module is imported, or in a preloaded setup()) can write an event line."""
    events = os.dup(1)
    os.dup2(2, 1)
    return events


def take_stdin() -> int:
    """A private copy of stdin for requests; fd 0 then reads /dev/null."""
    requests = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return requests


# Modules a child would otherwise import itself when it builds its server (grpc imports these
# lazily), and sysconfig's data: ~5-7 ms of every child's start, done here once. None starts a thread.
CHILD_IMPORTS = {
    "grpcio": ("grpc._server", "concurrent.futures.thread", "snakepit_bridge.server.forkserver_child"),
    "grpclib": ("concurrent.futures.thread", "snakepit_bridge.server.forkserver_child"),
}


def preload(settings: Settings) -> BaseAdapter | None:
    """Import what every child needs, once: the server, the transport (grpc; no server is created), the
    adapter's module and its tool specs; run setup() here when the adapter opts in to __fork_preload__."""
    missing = missing_transport_package(settings.transport)
    if missing:
        raise CannotStart(missing)
    from ..threadsafety.declaration import UnsafeAdapterError, require_thread_safe_declaration
    from . import worker
    from .servicer import ServerInfo

    importlib.import_module(f".transport_{settings.transport}", __package__)
    for name in CHILD_IMPORTS.get(settings.transport, ()):
        importlib.import_module(name)
    sysconfig.get_config_vars()  # read (and cached) once: the ready line reports the build's GIL kind
    args = settings.args
    try:
        adapter_cls = worker.load_adapter_class(args.adapter)
        if settings.mode.many_calls:
            require_thread_safe_declaration(adapter_cls, allow_unsafe=args.allow_unsafe_adapter, log=log)
    except (worker.StartupError, UnsafeAdapterError) as exc:
        raise CannotStart(str(exc)) from None
    adapter_cls.tool_specs()  # cached on the class: children inherit it built
    if getattr(adapter_cls, "__fork_preload__", False) is not True:
        return None
    info = ServerInfo(worker_mode=settings.mode.name, max_workers=settings.max_workers, worker_index=0)
    try:
        return worker.create_adapter(adapter_cls, info, args.adapter)
    except worker.StartupError as exc:
        raise CannotStart(str(exc)) from None


class ForkServer:
    """The loop: requests from stdin, children's output and deaths, all on one thread (the one that
    forks: a fork from a single-threaded process copies no lock that another thread holds)."""

    def __init__(self, settings: Settings, argv: list[str], events: EventWriter, requests: int,
                 preloaded: BaseAdapter | None) -> None:
        self.settings = settings
        self.argv = argv
        self.events = events
        self.requests = requests
        self.preloaded = preloaded
        self.reader = RequestReader()
        self.children: dict[str, Child] = {}
        self.selector = selectors.DefaultSelector()
        self.stop_reason: str | None = None
        self.signalled: str | None = None  # SIGTERM/SIGINT seen by the handler, acted on by the loop
        self.kill_at: float | None = None
        self.give_up_at: float | None = None
        # SIGCHLD (and SIGTERM, SIGINT) wake the selector through this pipe: a child's death is seen at once.
        self.wakeup_read, self.wakeup_write = os.pipe()
        for fd in (self.wakeup_read, self.wakeup_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wakeup_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, self.drain_wakeup)
        self.selector.register(self.requests, selectors.EVENT_READ, self.read_requests)

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        while not (self.stop_reason and not self.children):
            for key, _ in self.selector.select(self.select_timeout()):
                key.data(key.fd)
            self.reap()
            if self.signalled:
                self.begin_stop(self.signalled)
            if self.events.broken:
                self.begin_stop("stdout closed")
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                self.kill_at = None
                self.give_up_at = now + REAP_LIMIT_SECONDS
                for child in self.children.values():
                    log.warning("child %s (pid %d) still running %.0f s after SIGTERM: SIGKILL", child.id,
                                child.pid, STOP_GRACE_SECONDS)
                    self.send(child, signal.SIGKILL)
            if self.give_up_at is not None and now >= self.give_up_at:
                log.error("children not reaped %.0f s after SIGKILL: %s", REAP_LIMIT_SECONDS,
                          ", ".join(f"{child.id} (pid {child.pid})" for child in self.children.values()))
                return 1
        log.info("fork server stopped (%s)", self.stop_reason)
        return 0

    def select_timeout(self) -> float | None:
        deadline = self.kill_at if self.kill_at is not None else self.give_up_at
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def on_signal(self, signum: int, frame) -> None:
        # Runs between two bytecodes of the loop; the wakeup pipe has woken the selector already.
        if signum != signal.SIGCHLD:
            self.signalled = signal.Signals(signum).name

    def drain_wakeup(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass

    # --- requests --------------------------------------------------------------------------------
    def read_requests(self, fd: int) -> None:
        data = os.read(fd, READ_CHUNK)
        lines = self.reader.feed(data) if data else self.reader.finish()
        for line in lines:
            try:
                if isinstance(line, BadRequest):
                    raise line
                self.serve_request(parse_request(line))
            except BadRequest as bad:
                self.events.write(error_event(bad.id, bad.message))
        if not data:
            self.selector.unregister(fd)
            self.begin_stop("stdin closed")

    def serve_request(self, request: Spawn | Signal) -> None:
        if isinstance(request, Signal):
            child = self.children.get(request.id)
            if child is None:
                raise BadRequest(request.id, f"signal {request.id}: no running child has that id")
            self.send(child, request.signum)
            return
        if self.stop_reason:
            raise BadRequest(request.id, f"spawn {request.id}: the fork server is stopping ({self.stop_reason})")
        running = self.children.get(request.id)
        if running is not None:
            raise BadRequest(request.id, f"spawn {request.id}: a child with that id is running (pid {running.pid})")
        self.spawn(request, self.child_settings(request))

    def child_settings(self, request: Spawn) -> Settings:
        """The child's flags, parsed here before any fork, so that a bad one is an error event."""
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                return parse_settings(self.settings.mode, [*self.argv, *request.args])
        except SystemExit as exc:
            lines = captured.getvalue().strip().splitlines()
            message = lines[-1].split(": error: ", 1)[-1] if exc.code and lines else "--help is not a worker's flag"
            raise BadRequest(request.id, f"spawn {request.id}: {message}") from None

    # --- children --------------------------------------------------------------------------------
    def spawn(self, request: Spawn, settings: Settings) -> None:
        from .forkserver_child import FORK_SERVER_SIGNALS, ChildPipes, run_child

        stdin_read, stdin_write = os.pipe()
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        pipes = ChildPipes(stdin_read, out_write, err_write)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would print the fork server's buffered text again
        fork_server_pid = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, FORK_SERVER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SERVER_SIGNALS)
            for fd in (stdin_read, stdin_write, out_read, out_write, err_read, err_write):
                os.close(fd)
            raise BadRequest(request.id, f"spawn {request.id}: fork failed: {exc}") from None
        if pid == 0:
            run_child(request, settings, pipes, fork_server_pid,
                      functools.partial(self.close_in_child, (stdin_write, out_read, err_read)), self.preloaded)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SERVER_SIGNALS)
        for fd in (stdin_read, out_write, err_write):
            os.close(fd)
        child = Child(request.id, pid, stdin_write)
        for fd, kind in ((out_read, "out"), (err_read, "err")):
            os.set_blocking(fd, False)
            child.streams[fd] = (kind, LineSplitter())
            self.selector.register(fd, selectors.EVENT_READ, functools.partial(self.read_output, child))
        self.children[request.id] = child
        self.events.write(event(request.id, "spawned", str(pid)))

    def close_in_child(self, own: tuple[int, ...]) -> None:
        """In a new child: close what belongs to the fork server (its event and request pipes, the
        selector, the wakeup pipe, the other children's pipes, this child's far ends). Only those: a
        preloaded setup() may have opened files that the child keeps using."""
        self.selector.close()
        fds = {self.events.fd, self.requests, self.wakeup_read, self.wakeup_write, *own}
        for child in self.children.values():
            fds.update((child.stdin, *child.streams))
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def send(self, child: Child, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it is a zombie until reaped, so this is rare
            os.kill(child.pid, signum)

    def read_output(self, child: Child, fd: int) -> bool:
        """Relay what is in one of the child's pipes; False once nothing more is there for now."""
        if fd not in child.streams:  # closed earlier in this round of the loop
            return False
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        kind, splitter = child.streams[fd]
        lines = splitter.feed(data) if data else splitter.finish()
        for line in lines:
            self.events.write(event(child.id, kind, line))
        if not data:
            self.close_stream(child, fd)
        return bool(data)

    def close_stream(self, child: Child, fd: int) -> None:
        self.selector.unregister(fd)
        os.close(fd)
        del child.streams[fd]

    def reap(self) -> None:
        # waitpid per child and never waitpid(-1): a preloaded adapter's own subprocesses are not ours to reap.
        for child in list(self.children.values()):
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:  # someone else reaped it
                pid, status = child.pid, 255 << 8
            if pid:
                self.finished(child, os.waitstatus_to_exitcode(status))

    def finished(self, child: Child, code: int) -> None:
        """Its last output, then its exit event; then its pipes are closed and its id is free."""
        for fd in list(child.streams):
            for _ in range(DRAIN_READS):
                if fd not in child.streams or not self.read_output(child, fd):
                    break
            if fd in child.streams:
                kind, splitter = child.streams[fd]
                for line in splitter.finish():
                    self.events.write(event(child.id, kind, line))
                self.close_stream(child, fd)
        os.close(child.stdin)
        del self.children[child.id]
        self.events.write(event(child.id, "exit", str(code)))
        if code != 0 and not self.stop_reason:
            log.info("child %s (pid %d) exited with %d", child.id, child.pid, code)

    def begin_stop(self, reason: str) -> None:
        if self.stop_reason:
            return
        self.stop_reason = reason
        log.info("fork server stopping (%s): SIGTERM to %d children", reason, len(self.children))
        if self.requests in self.selector.get_map():
            self.selector.unregister(self.requests)
        for child in self.children.values():
            self.send(child, signal.SIGTERM)
        self.kill_at = time.monotonic() + STOP_GRACE_SECONDS if self.children else None

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for fd in (self.wakeup_read, self.wakeup_write, self.requests, self.events.fd):
            with contextlib.suppress(OSError):
                os.close(fd)

