"""Entry points of the two worker servers: `grpc_server_threaded.py` and `grpc_server_process.py`
call `main_threaded` / `main_process` (also the `snakepit-threaded` / `snakepit-process` scripts).

It sits above `worker` (one serving process), `prefork` (several, sharing a port) and `forkserver`
(workers forked on request), so none of those imports the other's caller.
"""
from __future__ import annotations

import os
import sys

from . import logs
from .settings import PROCESS, READY_NONCE_ENV, THREADED, Mode, parse_settings
from .transport import missing_transport_package


def serve(mode: Mode | str, argv: list[str] | None = None) -> int:
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
