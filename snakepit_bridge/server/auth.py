"""Bearer-token authentication for every RPC except the health service, the same on both transports.

The token is checked from the call's headers before the request message is read: a refused call
answers with a handler that never reads its request, so an unauthenticated client cannot make the
server receive and parse a large message. What remains: the transport still accepts the bytes that
its HTTP/2 flow-control window lets the client send before the refusal arrives (64 KiB at first;
grpcio's BDP probing can widen it), and the message-size limit (--max-message-mb) applies as always.
"""
from __future__ import annotations

import hmac

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerToken:
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def refusal(self, method: str, authorization: str | bytes | None) -> str | None:
        """Why a call of `method` with this 'authorization' header is refused, or None to let it in."""
        if method.startswith(HEALTH_PREFIX):
            return None
        if authorization is None:
            return "missing 'authorization: Bearer <token>' metadata"
        presented = authorization.encode() if isinstance(authorization, str) else authorization
        if hmac.compare_digest(presented, self._expected):
            return None
        return "invalid bearer token in the 'authorization' metadata"
