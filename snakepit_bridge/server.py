"""Command line and lifecycle of one serving process (the entry points are in `main.py`).

    python grpc_server_threaded.py [flags]   # many tool calls at once in one process
    python grpc_server_process.py  [flags]   # one tool call at a time per process

Readiness: once serving, one stdout line `SNAKEPIT_READY port=<port> pid=<pid>`, and the port written
atomically to $SNAKEPIT_READY_FILE when set. When $SNAKEPIT_READY_NONCE is set (the Elixir pool sets a
fresh one per spawn), the server removes it from the environment before the adapter is imported and
prints `SNAKEPIT_READY port=<port> pid=<pid> nonce=<nonce>` on a line of its own (a newline first ends
any partial line the adapter left), so adapter output cannot pass for readiness. A start-up failure
(the adapter's import or setup() raising, port in use) ends with one stderr line `error: <message>`
and exit code 1. Shutdown (SIGTERM, SIGINT, or stdin EOF with
--exit-on-stdin-eof): health turns NOT_SERVING, new calls are refused, in-flight calls get --grace
seconds to finish, then exit 0.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .gate import ToolGate
from .generated import snakepit_bridge_pb2 as pb
from .interpreter import gil_enabled
from .calls import CallTracker
from .servicer import BridgeServicer, ServerInfo, add_servicer_to_server
from .sessions import SessionStore
from .stats import ServerStats

if TYPE_CHECKING:
    from .thread_safety_checker import ThreadSafetyChecker

log = logging.getLogger("snakepit_bridge.server")



@dataclass(frozen=True)
class Mode:
    """How a server runs tool calls: everything that differs between the two entry scripts."""

    name: str             # "threaded" | "process": --mode, GetStats worker_mode, ServerInfo.worker_mode
    script: str
    default_adapter: str
    summary: str
    many_calls: bool      # many tool calls at once in one process (--max-workers), else one at a time

    @property
    def other(self) -> "Mode":
        return PROCESS if self is THREADED else THREADED


THREADED = Mode("threaded", "grpc_server_threaded.py",
                "snakepit_bridge.adapters.threaded_showcase.ThreadedShowcaseAdapter",
                "many calls at once in one process.", many_calls=True)
PROCESS = Mode("process", "grpc_server_process.py", "snakepit_bridge.adapters.showcase.ShowcaseAdapter",
               "one call at a time per process (for adapters that are not thread-safe).", many_calls=False)
MODES = {mode.name: mode for mode in (THREADED, PROCESS)}


def as_mode(mode: "Mode | str") -> Mode:
    return mode if isinstance(mode, Mode) else MODES[mode]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BridgeService"].full_name
CONTROL_THREADS = 8  # handler threads beyond tool slots + queue, so Ping/health/stats never starve
READY_NONCE_ENV = "SNAKEPIT_READY_NONCE"


class StartupError(Exception):
    """A configuration or start-up failure: printed as one line, exit code 1."""


def build_parser(mode: Mode) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=mode.script, description="Snakepit bridge worker: serves an adapter's tools over gRPC, " + mode.summary)
    add = parser.add_argument
    add("--adapter", default=mode.default_adapter, help="adapter class as module.Class (default: %(default)s)")
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=50052, help="port to listen on; 0 picks a free one (default: %(default)s)")
    add("--elixir-address", default=None,
        help="address of the Elixir node that started this worker; informational, never required, never dialled")
    add("--mode", choices=list(MODES), default=None,
        help=f"worker mode; accepted when it agrees with this script ({mode.name})")
    add("--log-level", default=os.environ.get("SNAKEPIT_LOG_LEVEL", "INFO"), type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="(default: %(default)s)")
    add("--max-message-mb", type=float, default=64.0, help="largest request or response in MiB (default: %(default)s)")
    add("--auth-token-env", metavar="NAME", default=None,
        help="environment variable holding a bearer token; every RPC but health must then carry "
             "'authorization: Bearer <token>'")
    add("--max-queue", type=int, default=128,
        help="tool calls allowed to wait for a free slot; more are RESOURCE_EXHAUSTED (default: %(default)s)")
    add("--grace", type=float, default=10.0,
        help="seconds in-flight calls get to finish at shutdown (default: %(default)s)")
    add("--exit-on-stdin-eof", action="store_true",
        help="shut down when stdin closes (how a BEAM port parent is watched: no orphan outlives it)")
    add("--session-ttl", type=float, default=3600.0,
        help="idle seconds before a session expires (default: %(default)s)")
    add("--max-session-ttl", type=float, default=86400.0,
        help="largest ttl_seconds a client may ask for; more is RESOURCE_EXHAUSTED (default: %(default)s)")
    add("--max-sessions", type=int, default=10000,
        help="sessions alive at once in this process; a new one past it is RESOURCE_EXHAUSTED (default: %(default)s)")
    add("--send-timeout", type=float, default=120.0,
        help="seconds a response (or a stream's next chunk) may wait for the client to read it before the call "
             "is cancelled; 0 waits forever (default: %(default)s)")
    add("--max-calls-per-connection", type=int, default=None,
        help="tool calls one client connection may have in flight; more are RESOURCE_EXHAUSTED "
             "(default: twice the calls the server admits, "
             + ("2 x (--max-workers + --max-queue))" if mode.many_calls else "2 x (1 + --max-queue))"))
    add("--session-dir", default=None,
        help="checkpoint sessions to this directory so they survive worker recycling and restarts")
    add("--rate-limit", type=float, default=None, metavar="N",
        help="at most N tool calls per second per process; a call over it waits for a token when one frees up "
             "before its deadline, else it is RESOURCE_EXHAUSTED at once")
    add("--rate-burst", type=float, default=None, help="token bucket size for --rate-limit (default: max(1, N))")
    add("--seed", type=int, default=None, help="root seed of the process RNG streams (default: OS entropy)")
    if mode.many_calls:
        add("--max-workers", type=int, default=16, help="tool calls run at once (default: %(default)s)")
        add("--thread-safety-check", action="store_true",
            help="run the ThreadSafetyChecker: report races on adapter state, unsafe libraries, undeclared safety")
        add("--thread-safety-strict", action="store_true",
            help="with --thread-safety-check: a finding fails the offending call")
        add("--thread-safety-report", metavar="PATH", default=None,
            help="with --thread-safety-check: write the JSON report here at shutdown")
        add("--allow-unsafe-adapter", action="store_true",
            help="serve an adapter that does not declare __thread_safe__ = True (with a warning)")
    else:
        add("--processes", type=int, default=1,
            help="pre-forked processes sharing the port (SO_REUSEPORT), each serving one call at a time")
    return parser


@dataclass
class Settings:
    mode: Mode
    args: argparse.Namespace

    @property
    def max_workers(self) -> int:
        return self.args.max_workers if self.mode.many_calls else 1

    @property
    def max_calls_per_connection(self) -> int:
        # Twice what the gate admits: a client that fills every slot and queue place is refused by the
        # gate first (server busy); the cap binds on calls whose responses wait for a slow reader.
        if self.args.max_calls_per_connection is not None:
            return self.args.max_calls_per_connection
        return 2 * (self.max_workers + self.args.max_queue)

    @property
    def handler_threads(self) -> int:
        # One connection at its cap still leaves every other client a thread per slot and queue place,
        # and the control RPCs theirs. The pool starts threads only as calls need them.
        return self.max_workers + self.args.max_queue + self.max_calls_per_connection + CONTROL_THREADS


def parse_settings(mode: Mode | str, argv: list[str] | None) -> Settings:
    mode = as_mode(mode)
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    if args.mode is not None and args.mode != mode.name:
        parser.error(f"--mode {args.mode} does not match this script, which runs {mode.name} workers; "
                     f"use {mode.other.script}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    if args.max_message_mb <= 0:
        parser.error("--max-message-mb must be positive")
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if args.grace < 0:
        parser.error("--grace must be 0 or more")
    if args.max_sessions < 1:
        parser.error("--max-sessions must be at least 1")
    if args.max_session_ttl <= 0:
        parser.error("--max-session-ttl must be positive")
    if not 0 < args.session_ttl <= args.max_session_ttl:
        parser.error(f"--session-ttl must be positive and at most --max-session-ttl ({args.max_session_ttl:g})")
    if args.send_timeout < 0:
        parser.error("--send-timeout must be 0 (no limit) or more")
    if args.max_calls_per_connection is not None and args.max_calls_per_connection < 1:
        parser.error("--max-calls-per-connection must be at least 1")
    if args.rate_limit is not None and args.rate_limit <= 0:
        parser.error("--rate-limit must be positive")
    if mode.many_calls:
        if args.max_workers < 1:
            parser.error("--max-workers must be at least 1")
        if (args.thread_safety_strict or args.thread_safety_report) and not args.thread_safety_check:
            parser.error("--thread-safety-strict and --thread-safety-report need --thread-safety-check")
    elif args.processes < 1:
        parser.error("--processes must be at least 1")
    return Settings(mode, args)


def load_adapter_class(path: str) -> type:
    from .adapter import BaseAdapter

    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise StartupError(f"--adapter must be module.Class, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # adapters in the working directory, as `python -m` would find them
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StartupError(f"cannot import adapter module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself raised: keep its traceback in the log, one line to the parent
        log.error("importing adapter module %r failed", module_name, exc_info=True)
        raise StartupError(f"cannot import adapter module {module_name!r}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise StartupError(f"adapter module {module_name!r} has no class {class_name!r}")
    if not issubclass(cls, BaseAdapter):
        raise StartupError(f"adapter {path} must subclass snakepit_bridge.BaseAdapter")
    return cls


class Worker:
    """One serving process: adapter, grpc server, lifecycle."""

    def __init__(self, settings: Settings, *, worker_index: int = 0, reuse_port: bool = False) -> None:
        self.settings = settings
        self.args = settings.args
        self.worker_index = worker_index
        self.reuse_port = reuse_port
        self.stop_requested = threading.Event()
        self.server: grpc.Server | None = None
        self.port = 0
        self.checker: ThreadSafetyChecker | None = None

    def start(self) -> int:
        args, mode = self.args, self.settings.mode
        adapter_cls = load_adapter_class(args.adapter)
        if mode.many_calls and not getattr(adapter_cls, "__thread_safe__", False):
            if not args.allow_unsafe_adapter:
                raise StartupError(
                    f"adapter {adapter_cls.__name__} does not declare thread safety, so the threaded server will not "
                    f"run it. Add `__thread_safe__ = True` to class {adapter_cls.__name__} once its shared state is "
                    "locked (see ThreadSafeAdapter), run it with grpc_server_process.py, or pass "
                    "--allow-unsafe-adapter to run it anyway.")
            log.warning("serving adapter %s, which does not declare __thread_safe__ = True, with %d threads "
                        "(--allow-unsafe-adapter)", adapter_cls.__name__, args.max_workers)
        if args.seed is not None:
            from .rng import set_global_seed

            set_global_seed(args.seed, worker_index=self.worker_index)
        if mode.many_calls and args.thread_safety_check:
            from .thread_safety_checker import ThreadSafetyChecker

            self.checker = ThreadSafetyChecker(enabled=True, strict_mode=args.thread_safety_strict)
        info = ServerInfo(worker_mode=mode.name, max_workers=self.settings.max_workers, worker_index=self.worker_index)
        try:
            adapter = adapter_cls()
            adapter.bind_server(info)
            adapter.setup()
        except Exception as exc:
            log.error("adapter %s setup failed", args.adapter, exc_info=True)
            raise StartupError(f"adapter setup failed: {type(exc).__name__}: {exc}") from None
        if self.checker is not None:
            self.checker.check_declaration(adapter_cls)
            self.checker.attach(adapter)
        self.adapter = adapter

        stats = ServerStats()
        self.gate = ToolGate(self.settings.max_workers, args.max_queue, on_queue_change=stats.queue_changed)
        self.sessions = SessionStore(default_ttl_seconds=args.session_ttl, session_dir=args.session_dir,
                                     max_sessions=args.max_sessions, max_ttl_seconds=args.max_session_ttl)
        self.calls = CallTracker(self.settings.max_calls_per_connection, args.send_timeout)
        rate_limiter = None
        if args.rate_limit is not None:
            from .ratelimit import RateLimiter

            rate_limiter = RateLimiter(args.rate_limit, args.rate_burst)
        self.batch_executor = None
        if self.settings.max_workers > 1:
            self.batch_executor = futures.ThreadPoolExecutor(self.settings.max_workers,
                                                             thread_name_prefix="snakepit-batch")
        self.servicer = BridgeServicer(adapter, info=info, gate=self.gate, sessions=self.sessions, stats=stats,
                                       batch_executor=self.batch_executor, rate_limiter=rate_limiter,
                                       checker=self.checker, adapter_name=args.adapter, calls=self.calls)

        message_bytes = int(args.max_message_mb * 1024 * 1024)
        options = [
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
        ]
        interceptors = []
        if args.auth_token_env:
            from .auth import BearerTokenInterceptor

            token = os.environ.get(args.auth_token_env, "")
            if not token:
                raise StartupError(
                    f"--auth-token-env {args.auth_token_env}: that environment variable is empty or unset")
            interceptors.append(BearerTokenInterceptor(token))
        # Thread names match the guide's logs: ThreadPoolExecutor-0_0, ThreadPoolExecutor-0_1, ...
        executor = futures.ThreadPoolExecutor(self.settings.handler_threads, thread_name_prefix="ThreadPoolExecutor-0")
        server = grpc.server(executor, interceptors=interceptors, options=options)
        add_servicer_to_server(self.servicer, server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            port = 0
            detail = str(exc)
        else:
            detail = ""
        if not port:
            raise StartupError(f"cannot listen on {address}: address already in use or not available"
                               + (f" ({detail})" if detail else ""))
        server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.server, self.port = server, port
        log.info("serving %s (%s, max_workers=%d, GIL %s) on %s:%d", args.adapter, mode.name, self.settings.max_workers,
                 "enabled" if gil_enabled() else "disabled", args.host, port)
        if args.elixir_address:
            log.info("started for Elixir node at %s", args.elixir_address)
        return port

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            log.info("shutting down (%s): draining in-flight calls for up to %.1f s", reason, self.args.grace)
            self.stop_requested.set()

    def shutdown(self) -> None:
        self.health.enter_graceful_shutdown()
        self.servicer.stopping.set()
        grace_ends = time.monotonic() + self.args.grace
        assert self.server is not None, "shutdown() before start()"
        stopped = self.server.stop(self.args.grace)
        # Tool calls get the whole grace period, counted by the tools themselves and not by their RPCs:
        # a call whose client left is a finished RPC to grpc while its tool still runs. Once no tool call
        # is left, streams that never end by themselves (a client's health Watch) must not hold the exit.
        while self.servicer.stats.requests_active > 0 and time.monotonic() < grace_ends:
            time.sleep(0.05)
        if not stopped.is_set():
            self.server.stop(0).wait()
        self.calls.close()
        if self.batch_executor is not None:
            self.batch_executor.shutdown(wait=False)
        self.sessions.close()
        try:
            self.adapter.teardown()
        except Exception:
            log.exception("adapter teardown failed")
        if self.checker is not None:
            if self.args.thread_safety_report:
                self.checker.write_report(self.args.thread_safety_report)
                log.info("thread safety report written to %s", self.args.thread_safety_report)
            close = getattr(self.checker, "close", None)
            if callable(close):
                close()
        log.info("stopped")


def announce_ready(port: int, nonce: str | None = None) -> None:
    """The readiness line on stdout (with the spawner's nonce when it gave one), and the port in
    $SNAKEPIT_READY_FILE (written atomically)."""
    ready_file = os.environ.get("SNAKEPIT_READY_FILE")
    if ready_file:
        tmp = f"{ready_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            handle.write(f"{port}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, ready_file)
    if nonce:
        sys.stdout.write(f"\nSNAKEPIT_READY port={port} pid={os.getpid()} nonce={nonce}\n")
    else:
        sys.stdout.write(f"SNAKEPIT_READY port={port} pid={os.getpid()}\n")
    sys.stdout.flush()


def watch_stdin(on_eof) -> None:
    def read_until_eof():
        try:
            stream = sys.stdin.buffer
            while stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
                pass
        except (OSError, ValueError):
            pass
        on_eof()

    threading.Thread(target=read_until_eof, name="snakepit-stdin-watch", daemon=True).start()


def install_stop_triggers(stop, exit_on_stdin_eof: bool) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop("SIGINT"))
    if exit_on_stdin_eof:
        watch_stdin(lambda: stop("stdin closed"))
