"""Which gRPC stack serves the one servicer: grpcio (C core; the default where it runs) or grpclib on h2
(pure Python; the default on free-threaded builds, where grpcio has no wheel and re-enables the GIL).
Both serve the same BridgeService, health and reflection, so callers cannot tell them apart."""
from __future__ import annotations

import importlib.util
import sys
import threading
from typing import TYPE_CHECKING, Protocol

from ..threadsafety.interpreter import free_threaded_build

if TYPE_CHECKING:
    from .auth import BearerToken
    from .endpoint import Endpoint
    from .worker import Worker

TRANSPORTS = ("auto", "grpcio", "grpclib")
# What each transport imports, checked before anything is loaded so that a Python without them fails
# with one line that names the missing module (the Elixir pool shows that line).
TRANSPORT_PACKAGES = {
    "grpcio": ("grpc", "grpc_health", "grpc_reflection", "google.protobuf"),
    "grpclib": ("grpclib", "h2", "google.protobuf"),
}


class Transport(Protocol):
    name: str

    def start(self, worker: Worker, endpoint: Endpoint, token: BearerToken | None) -> Endpoint | None:
        """Serve `worker.servicer` on `endpoint` (a TCP port, or a Unix socket whose path the worker has
        claimed: bound with `unix_socket.owner_only_umask`); returns where it listens (the port chosen for
        port 0), or None when it cannot listen."""

    def not_serving(self) -> None:
        """Health turns NOT_SERVING for every service (shutdown has begun)."""

    def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING for every service, the server running on (`rotation`)."""

    def stop(self, grace: float) -> threading.Event:
        """Refuse new RPCs; the event is set once every RPC has ended (cancelled after `grace`)."""

    def stop_now(self) -> None:
        """End every RPC still open."""


def resolve(name: str) -> str:
    """`auto` made concrete: grpclib on a free-threaded build, else grpcio."""
    if name != "auto":
        return name
    return "grpclib" if free_threaded_build() else "grpcio"


def open_transport(name: str) -> Transport:
    if resolve(name) == "grpclib":
        from .transport_grpclib import GrpclibTransport

        return GrpclibTransport()
    from .transport_grpcio import GrpcioTransport

    return GrpcioTransport()


def missing_transport_package(name: str) -> str | None:
    """The error message when this Python lacks a package the transport `name` needs, else None."""
    name = resolve(name)
    for package in TRANSPORT_PACKAGES[name]:
        try:
            found = importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            return (f"ModuleNotFoundError: No module named '{package}' (the {name} transport needs it: "
                    f"pip install the snakepit_bridge package into this Python, {sys.executable})")
    return None
