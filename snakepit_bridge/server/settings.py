"""The command line of one serving process: the two modes, the flags, and the settings parsed from them.

    python grpc_server_threaded.py [flags]   # many tool calls at once in one process
    python grpc_server_process.py  [flags]   # one tool call at a time per process
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .endpoint import Endpoint
from .tls import ServerTls, TlsConfigError, load_server_tls
from .transport import TRANSPORTS, resolve
from .unix_socket import path_problem

CONTROL_THREADS = 8  # handler threads beyond tool slots + queue, so Ping/health/stats never starve
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
# The spawner's per-spawn nonce for the ready line (worker.announce_ready); removed from the environment
# before any adapter code runs.
READY_NONCE_ENV = "SNAKEPIT_READY_NONCE"


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


def build_parser(mode: Mode) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=mode.script, description="Snakepit bridge worker: serves an adapter's tools over gRPC, " + mode.summary)
    add = parser.add_argument
    add("--adapter", default=mode.default_adapter, help="adapter class as module.Class (default: %(default)s)")
    # --host and --port default to None so that either one given with --uds is an error, not ignored.
    add("--host", default=None,
        help=f"address to listen on, or unix:PATH for a Unix socket as --uds PATH (default: {DEFAULT_HOST})")
    add("--port", type=int, default=None, help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})")
    add("--uds", metavar="PATH", default=None,
        help="listen on a Unix domain socket at PATH instead of TCP: mode 0600 (only this user can connect); "
             "a live server's socket there is an error, a dead one's is replaced; removed at exit")
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
    add("--tls-cert", metavar="PATH", default=None,
        help="serve TLS on the TCP port with this PEM certificate chain (needs --tls-key; not with --uds)")
    add("--tls-key", metavar="PATH", default=None, help="the PEM private key of --tls-cert (unencrypted)")
    add("--tls-client-ca", metavar="PATH", default=None,
        help="mutual TLS: every client must present a certificate signed by this PEM CA (needs --tls-cert)")
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
    add("--metrics-port", type=int, default=None, metavar="PORT",
        help="serve Prometheus metrics on http://<--metrics-host>:PORT/metrics (needs prometheus_client: "
             "the [metrics] extra); 0 picks a free port (default: off)")
    add("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default: %(default)s)")
    add("--shm-dir", default=None, metavar="DIR",
        help="take blobs from same-host callers as shared-memory regions in DIR (a directory of this user, "
             "mode 0700, on a tmpfs such as /dev/shm), and write large results there when a call asks "
             "(default: off, every blob inline)")
    add("--fork-server", action="store_true",
        help="serve no calls: import the adapter once, then fork workers on request (the pool's protocol on "
             "stdin/stdout: snakepit_bridge/server/forkserver.py); the other flags are every worker's")
    add("--transport", choices=TRANSPORTS, default="auto",
        help="gRPC stack: grpcio (C core) or grpclib (pure Python on h2, runs with the GIL off); auto picks "
             "grpclib on a free-threaded build, else grpcio (default: %(default)s)")
    add("--require-free-threading", action="store_true",
        help="refuse to start unless the GIL is off once the adapter and the transport are loaded")
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
    tls: ServerTls | None = None  # --tls-*, read and checked when the flags are parsed

    @property
    def max_workers(self) -> int:
        return self.args.max_workers if self.mode.many_calls else 1

    @property
    def endpoint(self) -> Endpoint:
        if self.args.uds is not None:
            return Endpoint.unix(self.args.uds)
        return Endpoint.tcp(self.args.host, self.args.port)

    @property
    def transport(self) -> str:
        return resolve(self.args.transport)

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
    check_endpoint(parser, args, mode)
    tls = check_tls(parser, args)
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
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    if args.rate_limit is not None and args.rate_limit <= 0:
        parser.error("--rate-limit must be positive")
    if mode.many_calls:
        if args.max_workers < 1:
            parser.error("--max-workers must be at least 1")
        if (args.thread_safety_strict or args.thread_safety_report) and not args.thread_safety_check:
            parser.error("--thread-safety-strict and --thread-safety-report need --thread-safety-check")
    elif args.processes < 1:
        parser.error("--processes must be at least 1")
    elif args.processes > 1 and args.fork_server:
        parser.error(f"--processes {args.processes} with --fork-server: the fork server's workers are one process "
                     "each; request as many as you need")
    elif args.processes > 1 and args.metrics_port is not None:
        parser.error("--metrics-port serves one process's counters; with --processes each process would need a port "
                     "of its own: run one worker per port (as the Elixir pool does) or use grpc_server_threaded.py")
    return Settings(mode, args, tls)


def check_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerTls | None:
    """The --tls-* files read and checked (tls.py), or None without them; TLS is for TCP ports only."""
    given = [flag for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                                      ("--tls-client-ca", args.tls_client_ca)) if value is not None]
    if given and args.uds is not None:
        parser.error(f"{' '.join(given)} with a Unix socket ({args.uds}): TLS is for TCP ports; a Unix socket "
                     "is reachable from this host only and guarded by its mode 0600. Drop the --tls-* flags, or "
                     "listen with --host/--port")
    try:
        return load_server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)
    except TlsConfigError as exc:
        parser.error(str(exc))


def check_endpoint(parser: argparse.ArgumentParser, args: argparse.Namespace, mode: Mode) -> None:
    """Settle where to listen: args.uds an absolute socket path (from --uds or --host unix:PATH), or
    args.host and args.port with their defaults filled in."""
    if args.host is not None and args.host.startswith("unix:"):
        if args.uds is not None:
            parser.error("--host unix:PATH and --uds PATH say the same thing twice: give one of them")
        # grpc's two spellings: unix:path (relative or absolute) and unix:///absolute/path
        args.uds = args.host[len("unix://"):] if args.host.startswith("unix://") else args.host[len("unix:"):]
        flag = f"--host {args.host}"
        args.host = None
    else:
        flag = f"--uds {args.uds}"
    if args.uds is None:
        args.host = DEFAULT_HOST if args.host is None else args.host
        args.port = DEFAULT_PORT if args.port is None else args.port
        if not 0 <= args.port <= 65535:
            parser.error(f"--port must be 0..65535, got {args.port}")
        return
    if not args.uds:
        parser.error(f"{flag}: the socket path is empty")
    if args.host is not None:
        parser.error(f"--host {args.host} and {flag}: a server listens on TCP or on a Unix socket, not both")
    if args.port is not None:
        parser.error(f"--port and {flag}: a Unix socket has no port; drop --port")
    # Absolute, so that the ready line names the socket wherever its reader runs.
    args.uds = os.path.abspath(args.uds)
    problem = path_problem(args.uds)
    if problem:
        parser.error(f"{flag}: {problem}")
    if not mode.many_calls and args.processes > 1:
        parser.error(f"--processes {args.processes} with {flag}: processes cannot share one Unix socket (there is "
                     "no SO_REUSEPORT for Unix sockets); start one worker per socket, or use grpc_server_threaded.py")
