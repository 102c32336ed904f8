"""The lifecycle of one serving process: adapter, grpc server, readiness, shutdown (flags: `settings.py`;
entry points: `main.py`).

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

import importlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..generated import snakepit_bridge_pb2 as pb
from ..threadsafety.declaration import UnsafeAdapterError, require_thread_safe_declaration
from ..threadsafety.interpreter import gil_enabled
from .calls import CallTracker
from .gate import ToolGate
from .servicer import BridgeServicer, ServerInfo, add_servicer_to_server
from .sessions import SessionStore
from .settings import Settings
from .stats import ServerStats

if TYPE_CHECKING:
    from ..threadsafety.checker import ThreadSafetyChecker

log = logging.getLogger("snakepit_bridge.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BridgeService"].full_name
READY_NONCE_ENV = "SNAKEPIT_READY_NONCE"


class StartupError(Exception):
    """A configuration or start-up failure: printed as one line, exit code 1."""


def load_adapter_class(path: str) -> type:
    from ..contract.adapter import BaseAdapter

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
        if mode.many_calls:
            try:
                require_thread_safe_declaration(adapter_cls, allow_unsafe=args.allow_unsafe_adapter, log=log)
            except UnsafeAdapterError as exc:
                raise StartupError(str(exc)) from None
        if args.seed is not None:
            from ..toolkit.rng import set_global_seed

            set_global_seed(args.seed, worker_index=self.worker_index)
        if mode.many_calls and args.thread_safety_check:
            from ..threadsafety.checker import ThreadSafetyChecker

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
            from ..toolkit.ratelimit import RateLimiter

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
