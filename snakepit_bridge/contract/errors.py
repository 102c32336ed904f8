"""Errors that carry a gRPC status code.

Tools raise `ToolError` to choose the status their caller sees; any other exception a tool raises
becomes UNKNOWN with its type, message and traceback. The other classes are raised by the bridge itself
for bad requests; their messages name the bad field.
"""
from __future__ import annotations

import grpc

# Trailing metadata key of a failed tool call: a serialized ToolError (type, message, traceback).
ERROR_TRAILER = "snakepit-error-bin"


class BridgeError(Exception):
    """An error with a gRPC status code and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, field: str = ""):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field


class ToolError(BridgeError):
    """Raise from a tool to fail the call with a chosen status code (default UNKNOWN).

        raise ToolError("model not loaded", code=grpc.StatusCode.FAILED_PRECONDITION)
    """


class InvalidArgument(BridgeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BridgeError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(BridgeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(BridgeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(BridgeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(BridgeError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(BridgeError):
    code = grpc.StatusCode.UNAVAILABLE
