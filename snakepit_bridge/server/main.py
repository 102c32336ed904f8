"""Entry points of the two worker servers: `grpc_server_threaded.py` and `grpc_server_process.py`
call `main_threaded` / `main_process` (also the `snakepit-threaded` / `snakepit-process` scripts).

It sits above both `server` (one serving process) and `prefork` (several, sharing a port), so neither
of those imports the other's caller.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from . import logs
from .settings import PROCESS, THREADED, Mode, parse_settings

READY_NONCE_ENV = "SNAKEPIT_READY_NONCE"
# What each transport imports, checked before anything is loaded so that a Python without them fails
# with one line that names the missing module (the Elixir pool shows that line).
TRANSPORT_PACKAGES = {
    "grpcio": ("grpc", "grpc_health", "grpc_reflection", "google.protobuf"),
    "grpclib": ("grpclib", "h2", "google.protobuf"),
}


def serve(mode: Mode | str, argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(mode, argv)
    except SystemExit as exc:  # argparse already printed the message
        return int(exc.code or 0)
    # Taken out before any adapter code runs, so an adapter cannot print a ready line that passes.
    ready_nonce = os.environ.pop(READY_NONCE_ENV, None)
    logs.configure(settings.args.log_level)
    missing = missing_package(settings.transport)
    if missing:
        print(f"error: ModuleNotFoundError: No module named '{missing}' (the {settings.transport} transport needs "
              f"it: pip install the snakepit_bridge package into this Python, {sys.executable})",
              file=sys.stderr, flush=True)
        return 1
    from .prefork import serve_preforked
    from .worker import serve_worker

    if not settings.mode.many_calls and settings.args.processes > 1:
        return serve_preforked(settings, ready_nonce)
    return serve_worker(settings, ready_nonce)


def missing_package(transport: str) -> str | None:
    for name in TRANSPORT_PACKAGES[transport]:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:  # its parent package is missing
            return name
    return None


def main_threaded(argv: list[str] | None = None) -> int:
    return serve(THREADED, argv)


def main_process(argv: list[str] | None = None) -> int:
    return serve(PROCESS, argv)
