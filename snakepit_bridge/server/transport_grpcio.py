"""The grpcio transport: BridgeService, health and reflection on grpcio's C-core server, tool calls in
its handler threads. The default wherever grpcio runs with the GIL (see transport_grpclib.py for
free-threaded builds)."""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from concurrent import futures
from typing import TYPE_CHECKING, Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..generated import snakepit_bridge_pb2 as pb
from . import wire
from .auth import BearerToken
from .failures import undecodable_request
from .unix_socket import owner_only_umask

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .tls import ServerTls
    from .servicer import BridgeServicer
    from .worker import Worker

log = logging.getLogger("snakepit_bridge.server")

SERVICE = pb.DESCRIPTOR.services_by_name["BridgeService"]


class GrpcioTransport:
    name = "grpcio"

    def __init__(self) -> None:
        self.server: grpc.Server | None = None
        self.health: Any = None

    def start(self, worker: Worker, endpoint: Endpoint, token: BearerToken | None) -> Endpoint | None:
        """Listen on `endpoint` and serve; returns where it listens (None when it cannot)."""
        settings = worker.settings
        message_bytes = int(settings.args.max_message_mb * 1024 * 1024)
        options = [
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 1 if worker.reuse_port else 0),
        ]
        interceptors = [BearerTokenInterceptor(token)] if token is not None else []
        # Thread names match the guide's logs: ThreadPoolExecutor-0_0, ThreadPoolExecutor-0_1, ...
        executor = futures.ThreadPoolExecutor(settings.handler_threads, thread_name_prefix="ThreadPoolExecutor-0")
        server = grpc.server(executor, interceptors=interceptors, options=options)
        add_servicer_to_server(worker.servicer, server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            # add_insecure_port binds (a socket file is created here), start() only accepts.
            with owner_only_umask() if endpoint.is_unix else contextlib.nullcontext():
                if settings.tls is None:
                    port = server.add_insecure_port(endpoint.target)
                else:
                    port = server.add_secure_port(endpoint.target, server_credentials(settings.tls))
        except RuntimeError as exc:
            log.debug("cannot listen on %s: %s", endpoint, exc)
            port = 0
        if not port:
            return None
        server.start()
        if settings.tls is not None:
            log.info("%s", settings.tls.describe())
        for service in ("", SERVICE.full_name):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        return endpoint if endpoint.is_unix else endpoint.with_port(port)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE.full_name):
            self.health.set(service, status)

    def not_serving(self) -> None:
        """Health turns NOT_SERVING (for every service) and stays so."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float) -> threading.Event:
        """Refuse new RPCs; the event is set once every RPC ended (or `grace` passed and they were cancelled)."""
        assert self.server is not None, "stop() before start()"
        return self.server.stop(grace)

    def stop_now(self) -> None:
        assert self.server is not None
        self.server.stop(0).wait()


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """grpcio's TLS for the port; with a client CA, a client without a certificate it signed is refused
    in the handshake."""
    return grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)], root_certificates=tls.client_ca,
                                       require_client_auth=tls.requires_client_cert)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        authorization = next((value for key, value in handler_call_details.invocation_metadata or ()
                              if key == "authorization"), None)
        refusal = self.token.refusal(handler_call_details.method, authorization)
        return handler if refusal is None else _deny(handler, refusal)


def _deny(handler, message: str):
    # A request-streaming handler whatever the method: grpc hands it an iterator that reads messages only
    # when asked, and this one never asks (a unary handler would get the whole message, parsed, first).
    def refuse(request_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=handler.response_serializer)


class UndecodableRequest:
    """What the lenient deserializer hands the handler instead of raising: grpcio would turn a
    deserializer's exception into INTERNAL, but bytes that are not the request message are the
    client's error."""

    __slots__ = ("message_type", "error")

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error


def _lenient(message_class) -> Callable[[bytes], Any]:
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.full_name
    blob_field = wire.REQUEST_BLOB_FIELDS.get(name)
    if blob_field is not None:  # large blobs stay in the received bytes (wire.py)
        def parse(data: bytes, split=wire.split, message_class=message_class):
            return split(data, message_class, blob_field)

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # google.protobuf.message.DecodeError, or invalid UTF-8 in a string field
            return UndecodableRequest(name, exc)

    return deserialize


def _serialize(message) -> bytes:
    """A protobuf message, or a wire.WireMessage already serialised: both answer SerializeToString."""
    return message.SerializeToString()


def _refuse_undecodable(behaviour: Callable) -> Callable:
    # The same wrapper serves unary and streaming methods: a streaming behaviour's generator is
    # returned untouched.
    @functools.wraps(behaviour)
    def checked(request, context):
        if type(request) is UndecodableRequest:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable_request(request.message_type, request.error))
        return behaviour(request, context)

    return checked


def add_servicer_to_server(servicer: BridgeServicer, server: grpc.Server) -> None:
    """Register BridgeService like the generated `add_BridgeServiceServicer_to_server`, with request
    bytes that do not parse answered INVALID_ARGUMENT (naming the message type) instead of INTERNAL."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        behaviour = _refuse_undecodable(getattr(servicer, method.name))
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=_lenient(request_class),
                                     response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
