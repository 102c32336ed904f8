"""Entry points of the two worker servers: `grpc_server_threaded.py` and `grpc_server_process.py`
call `main_threaded` / `main_process` (also the `snakepit-threaded` / `snakepit-process` scripts).

It sits above `worker` (one serving process), `prefork` (several, sharing a port) and `forkserver`
(workers forked on request), so none of those imports the other's caller.

Once any of them has shut down, the interpreter's own exit (joining threads, atexit handlers, grpc's
teardown) may take EXIT_TIMEOUT_SECONDS; an exit that hangs past it (an adapter's thread that never
ends) writes every thread's stack to stderr and ends the process with exit code 1, so a SIGTERM
always ends a server.
"""
from __future__ import annotations

import faulthandler
import os
import sys

from . import logs
from .settings import PROCESS, READY_NONCE_ENV, THREADED, Mode, parse_settings
from .transport import missing_transport_package


EXIT_TIMEOUT_SECONDS = 5.0


def serve(mode: Mode | str, argv: list[str] | None = None) -> int:
    code = _serve(mode, argv)
    # faulthandler's own C thread, not a Python one: it fires even where no Python thread runs any more.
    faulthandler.dump_traceback_later(EXIT_TIMEOUT_SECONDS, exit=True)
    return code


def _serve(mode: Mode | str, argv: list[str] | None) -> int:
    try:
        settings = parse_settings(mode, argv)
    except SystemExit as exc:  # argparse already printed the message
        return int(exc.code or 0)
    # Taken out before any adapter code runs, so an adapter cannot print a ready line that passes.
    ready_nonce = os.environ.pop(READY_NONCE_ENV, None)
    logs.configure(settings.args.log_level)
    if settings.args.fork_server:
        from .forkserver import serve_fork_server

        return serve_fork_server(settings, list(sys.argv[1:] if argv is None else argv), ready_nonce)
    missing = missing_transport_package(settings.transport)
    if missing:
        print(f"error: {missing}", file=sys.stderr, flush=True)
        return 1
    from .prefork import serve_preforked
    from .worker import serve_worker

    if not settings.mode.many_calls and settings.args.processes > 1:
        return serve_preforked(settings, ready_nonce)
    return serve_worker(settings, ready_nonce)


def main_threaded(argv: list[str] | None = None) -> int:
    return serve(THREADED, argv)


def main_process(argv: list[str] | None = None) -> int:
    return serve(PROCESS, argv)
