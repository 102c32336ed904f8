"""Bearer-token authentication for every RPC except the health service.

The token is checked from the call's headers before the request message is read: a refused call
answers with a handler that never reads its request, so an unauthenticated client cannot make the
server receive and parse a large message. What remains: gRPC core still accepts the bytes that its
HTTP/2 flow-control window lets the client send before the refusal arrives (64 KiB at first; grpc's
BDP probing can widen it), and the message-size limit (--max-message-mb) applies as always.
"""
from __future__ import annotations

import hmac

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(presented, self._expected):
                    return handler
                return _deny(handler, "invalid bearer token in the 'authorization' metadata")
        return _deny(handler, "missing 'authorization: Bearer <token>' metadata")


def _deny(handler, message: str):
    # A request-streaming handler whatever the method: grpc hands it an iterator that reads messages only
    # when asked, and this one never asks (a unary handler would get the whole message, parsed, first).
    def refuse(request_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
