"""The lifecycle of one serving process: adapter, grpc server, readiness, shutdown (flags: `settings.py`;
entry points: `main.py`).

    python grpc_server_threaded.py [flags]   # many tool calls at once in one process
    python grpc_server_process.py  [flags]   # one tool call at a time per process

Readiness: once serving, one stdout line `SNAKEPIT_READY port=<port> pid=<pid>` (with --uds:
`SNAKEPIT_READY uds=<absolute path> pid=<pid>`), and the port (or the path) written atomically to
$SNAKEPIT_READY_FILE when set. When $SNAKEPIT_READY_NONCE is set (the Elixir pool sets a fresh one per
spawn), the server removes it from the environment before the adapter is imported and appends
` nonce=<nonce>` to the line, printed on a line of its own (a newline first ends any partial line the
adapter left), so adapter output cannot pass for readiness. A start-up failure (the adapter's import
or setup() raising, port or socket in use) ends with one stderr line `error: <message>` and exit code
1. Shutdown (SIGTERM, SIGINT, or stdin EOF with --exit-on-stdin-eof): health turns NOT_SERVING, new
calls are refused, in-flight calls get --grace seconds to finish, the socket file of --uds is
removed, then exit 0 (`main.serve` bounds how long the interpreter's exit may take after that).
SIGUSR1 / SIGUSR2 turn health NOT_SERVING / SERVING without stopping (`rotation`).
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from concurrent import futures
from typing import TYPE_CHECKING

from ..threadsafety.declaration import UnsafeAdapterError, require_thread_safe_declaration
from ..threadsafety.interpreter import free_threaded_build, gil_enabled
from .calls import CallTracker
from .endpoint import Endpoint
from .gate import ToolGate
from .rotation import install_rotation_signals
from .servicer import BridgeServicer, ServerInfo
from .sessions import SessionStore
from .settings import Settings
from .stats import ServerStats
from .transport import Transport, open_transport
from .unix_socket import UnixSocketClaim, UnixSocketError

if TYPE_CHECKING:
    from ..contract.adapter import BaseAdapter
    from ..threadsafety.checker import ThreadSafetyChecker
    from .auth import BearerToken
    from .otel import CallTracing

log = logging.getLogger("snakepit_bridge.server")


# Seconds between health turning NOT_SERVING at shutdown and the transport refusing new streams.
NOT_SERVING_NOTICE = 0.1


class StartupError(Exception):
    """A configuration or start-up failure: printed as one line, exit code 1."""


def load_adapter_class(path: str) -> type[BaseAdapter]:
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


def create_adapter(adapter_cls: type[BaseAdapter], info: ServerInfo, name: str) -> BaseAdapter:
    """An instance of the adapter, bound to the server and set up (its setup() raising is a StartupError)."""
    try:
        adapter = adapter_cls()
        adapter.bind_server(info)
        adapter.setup()
    except Exception as exc:
        log.error("adapter %s setup failed", name, exc_info=True)
        raise StartupError(f"adapter setup failed: {type(exc).__name__}: {exc}") from None
    return adapter


def teardown_adapter(adapter: BaseAdapter) -> None:
    try:
        adapter.teardown()
    except Exception:
        log.exception("adapter teardown failed")


class Worker:
    """One serving process: adapter, grpc server, lifecycle."""

    def __init__(self, settings: Settings, *, worker_index: int = 0, reuse_port: bool = False,
                 preloaded_adapter: BaseAdapter | None = None) -> None:
        self.settings = settings
        # An adapter whose setup() already ran in the fork server (forkserver.py, `__fork_preload__`):
        # this worker serves it as it is, and its teardown() is the fork server's to run, once.
        self.preloaded_adapter = preloaded_adapter
        self.args = settings.args
        self.worker_index = worker_index
        self.reuse_port = reuse_port
        self.stop_requested = threading.Event()
        self.transport: Transport | None = None
        self.endpoint: Endpoint | None = None  # where it listens, once it does (the port chosen for --port 0)
        self.socket_claim: UnixSocketClaim | None = None
        self.checker: ThreadSafetyChecker | None = None

    def start(self) -> Endpoint:
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
        if self.preloaded_adapter is not None:
            adapter = self.preloaded_adapter
            adapter.bind_server(info)  # this process's ServerInfo; setup() saw the fork server's
        else:
            adapter = create_adapter(adapter_cls, info, args.adapter)
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
        self.tracing = self.start_tracing(mode)
        shm = None
        if args.shm_dir is not None:
            from .shm import RegionDir

            try:
                shm = RegionDir(args.shm_dir)
            except ValueError as exc:
                raise StartupError(f"--shm-dir: {exc}") from None
        self.servicer = BridgeServicer(adapter, info=info, gate=self.gate, sessions=self.sessions, stats=stats,
                                       batch_executor=self.batch_executor, rate_limiter=rate_limiter,
                                       checker=self.checker, adapter_name=args.adapter, calls=self.calls,
                                       tracing=self.tracing, shm=shm)

        token = None
        if args.auth_token_env:
            from .auth import BearerToken

            secret = os.environ.get(args.auth_token_env, "")
            if not secret:
                raise StartupError(
                    f"--auth-token-env {args.auth_token_env}: that environment variable is empty or unset")
            token = BearerToken(secret)
        self.transport = open_transport(self.settings.transport)
        self.endpoint = self.listen(self.transport, self.settings.endpoint, token)
        if args.metrics_port is not None:
            try:
                self.start_metrics()
            except StartupError:
                self.stop_quietly()
                raise
        log.info("serving %s (%s, max_workers=%d, GIL %s, %s transport) on %s", args.adapter, mode.name,
                 self.settings.max_workers, "enabled" if gil_enabled() else "disabled", self.transport.name,
                 self.endpoint)
        if args.elixir_address:
            log.info("started for Elixir node at %s", args.elixir_address)
        return self.endpoint

    def listen(self, transport: Transport, endpoint: Endpoint, token: BearerToken | None) -> Endpoint:
        """Claim the --uds path first (unix_socket.py: one server per path), then start the transport."""
        if endpoint.path is not None:
            self.socket_claim = UnixSocketClaim(endpoint.path)
            try:
                self.socket_claim.acquire()
            except UnixSocketError as exc:
                self.socket_claim = None
                raise StartupError(str(exc)) from None
        listening = transport.start(self, endpoint, token)
        if listening is None:
            self.release_socket()
            raise StartupError(f"cannot listen on {endpoint}: address already in use or not available")
        if self.socket_claim is not None:
            self.socket_claim.bound()
        return listening

    def start_tracing(self, mode) -> CallTracing | None:
        """OpenTelemetry spans when the OTEL_* environment asks for them (otel.py), else None."""
        from .otel import OtelConfigError, configure

        try:
            tracing = configure(resource_attributes={"process.pid": os.getpid(), "snakepit.worker_mode": mode.name,
                                                     "snakepit.worker_index": self.worker_index})
        except OtelConfigError as exc:
            raise StartupError(str(exc)) from None
        if tracing is not None:
            log.info("OpenTelemetry spans on (%s)", "this process's tracer provider" if tracing.provider is None
                     else os.environ.get("OTEL_TRACES_EXPORTER") or "otlp")
        return tracing

    def start_metrics(self) -> None:
        args = self.args
        try:
            import prometheus_client  # noqa: F401

            from .metrics import serve_metrics
        except ImportError:
            raise StartupError(
                "--metrics-port needs prometheus_client: pip install 'snakepit_bridge[metrics]'") from None
        try:
            port = serve_metrics(self.servicer, args.metrics_host, args.metrics_port)
        except OSError as exc:
            raise StartupError(
                f"--metrics-port: cannot listen on {args.metrics_host}:{args.metrics_port}: {exc}") from None
        self.metrics_port = port
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, port)

    def stop_quietly(self) -> None:
        """Stop listening at once (a start-up that fails after the transport started)."""
        if self.transport is not None and self.endpoint is not None:
            self.transport.stop_now()
        self.release_socket()

    def release_socket(self) -> None:
        if self.socket_claim is not None:
            self.socket_claim.release()

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            log.info("shutting down (%s): draining in-flight calls for up to %.1f s", reason, self.args.grace)
            self.stop_requested.set()

    def set_serving(self, serving: bool, reason: str) -> None:
        """Health SERVING or NOT_SERVING without stopping (see `rotation`); ignored once shutdown began."""
        if self.transport is None or self.servicer.stopping.is_set():
            return
        log.info("%s (%s)", "back in rotation: SERVING" if serving else "out of rotation: NOT_SERVING", reason)
        self.transport.set_serving(serving)

    def shutdown(self) -> None:
        assert self.transport is not None, "shutdown() before start()"
        self.servicer.stopping.set()  # first: a client that sees NOT_SERVING is refused from then on
        self.transport.not_serving()
        # Clients that watch health (a remote Elixir pool) take it out of rotation now; a call they sent
        # meanwhile is refused UNAVAILABLE by the servicer (never run: safe to retry elsewhere) rather
        # than cancelled by a transport that already stopped.
        time.sleep(NOT_SERVING_NOTICE)
        grace_ends = time.monotonic() + self.args.grace
        stopped = self.transport.stop(self.args.grace)
        # Tool calls get the whole grace period, counted by the tools themselves and not by their RPCs:
        # a call whose client left is a finished RPC to grpc while its tool still runs. Once no tool call
        # is left, streams that never end by themselves (a client's health Watch) must not hold the exit.
        while self.servicer.stats.requests_active > 0 and time.monotonic() < grace_ends:
            time.sleep(0.05)
        if not stopped.is_set():
            self.transport.stop_now()
        self.release_socket()  # nothing listens on it any more: the next server may take the path
        self.calls.close()
        if self.batch_executor is not None:
            self.batch_executor.shutdown(wait=False)
        self.sessions.close()
        if self.preloaded_adapter is None:
            teardown_adapter(self.adapter)
        if self.checker is not None:
            if self.args.thread_safety_report:
                self.checker.write_report(self.args.thread_safety_report)
                log.info("thread safety report written to %s", self.args.thread_safety_report)
            close = getattr(self.checker, "close", None)
            if callable(close):
                close()
        if self.tracing is not None:
            self.tracing.shutdown()
        log.info("stopped")


GIL_WARNING = "global interpreter lock"  # in CPython's RuntimeWarning when an import turns the GIL on


def start_serving(worker: Worker) -> Endpoint:
    """`worker.start()`, telling whether the GIL is on once the adapter and the transport are loaded:
    on a free-threaded build, an extension module that does not declare itself free-threading-safe
    turns it on at import, and CPython's warning says which module and how to override it. With
    --require-free-threading a GIL that is on is a start-up error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        endpoint = worker.start()
    reasons = []
    for warning in caught:
        if GIL_WARNING in str(warning.message):
            reasons.append(str(warning.message))
            log.warning("%s", warning.message)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if free_threaded_build():
        log.info("free-threaded build: GIL %s", "disabled" if not gil_enabled() else "ENABLED")
    if worker.args.require_free_threading and gil_enabled():
        worker.stop_quietly()
        why = "; ".join(reasons) if reasons else (
            "this interpreter is not a free-threaded build" if not free_threaded_build()
            else "it was enabled at start-up (PYTHON_GIL=1 or -X gil=1)")
        raise StartupError(f"--require-free-threading: the GIL is enabled: {why}")
    return endpoint


def serve_worker(settings: Settings, ready_nonce: str | None, preloaded_adapter: BaseAdapter | None = None) -> int:
    """Serve until told to stop (install_stop_triggers), then shut down: the exit code of one serving
    process, whether the script started it or the fork server forked it."""
    worker = Worker(settings, preloaded_adapter=preloaded_adapter)
    try:
        endpoint = start_serving(worker)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    install_stop_triggers(worker.request_stop, settings.args.exit_on_stdin_eof)
    install_rotation_signals(worker.set_serving)
    announce_ready(endpoint, ready_nonce)
    while not worker.stop_requested.wait(0.5):
        pass
    worker.shutdown()
    if worker.servicer.stats.requests_active > 0:
        # Calls still running after --grace were cancelled for their clients; the interpreter's normal
        # exit would join their handler threads and wait for the tools anyway, so leave now.
        log.warning("exiting with %d tool calls still running after the grace period",
                    worker.servicer.stats.requests_active)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


def announce_ready(endpoint: Endpoint, nonce: str | None = None) -> None:
    """The readiness line on stdout (with the spawner's nonce when it gave one), and the port (or the
    socket's path) in $SNAKEPIT_READY_FILE (written atomically)."""
    ready_file = os.environ.get("SNAKEPIT_READY_FILE")
    if ready_file:
        tmp = f"{ready_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            handle.write(f"{endpoint.ready_file_text}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, ready_file)
    if nonce:
        sys.stdout.write(f"\nSNAKEPIT_READY {endpoint.ready_field} pid={os.getpid()} nonce={nonce}\n")
    else:
        sys.stdout.write(f"SNAKEPIT_READY {endpoint.ready_field} pid={os.getpid()}\n")
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
