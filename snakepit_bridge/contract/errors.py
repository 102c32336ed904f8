"""Errors that carry a gRPC status code.

Tools raise `ToolError` to choose the status their caller sees; any other exception a tool raises
becomes UNKNOWN with its type, message and traceback. The other classes are raised by the bridge itself
for bad requests; their messages name the bad field.
"""
from __future__ import annotations

import enum
from typing import Any


class StatusCode(enum.Enum):
    """The gRPC status codes, named and numbered as `grpc.StatusCode` (values `(number, name)`), so that
    the contract and the server need no grpcio: the free-threaded transport runs without it.
    Wherever a code is taken, `grpc.StatusCode.X` is accepted as well."""

    OK = (0, "ok")
    CANCELLED = (1, "cancelled")
    UNKNOWN = (2, "unknown")
    INVALID_ARGUMENT = (3, "invalid argument")
    DEADLINE_EXCEEDED = (4, "deadline exceeded")
    NOT_FOUND = (5, "not found")
    ALREADY_EXISTS = (6, "already exists")
    PERMISSION_DENIED = (7, "permission denied")
    RESOURCE_EXHAUSTED = (8, "resource exhausted")
    FAILED_PRECONDITION = (9, "failed precondition")
    ABORTED = (10, "aborted")
    OUT_OF_RANGE = (11, "out of range")
    UNIMPLEMENTED = (12, "unimplemented")
    INTERNAL = (13, "internal")
    UNAVAILABLE = (14, "unavailable")
    DATA_LOSS = (15, "data loss")
    UNAUTHENTICATED = (16, "unauthenticated")

    @property
    def number(self) -> int:
        return self.value[0]

    @classmethod
    def of(cls, code: Any) -> StatusCode:
        """`code` as a StatusCode: one of ours, a `grpc.StatusCode`, or a name."""
        if isinstance(code, cls):
            return code
        name = code if isinstance(code, str) else getattr(code, "name", None)
        if isinstance(name, str) and name in cls.__members__:
            return cls[name]
        raise TypeError(f"not a gRPC status code: {code!r}")


# Trailing metadata key of a failed tool call: a serialized ToolError (type, message, traceback).
ERROR_TRAILER = "snakepit-error-bin"


class BridgeError(Exception):
    """An error with a gRPC status code and a message meant for the caller."""

    code: StatusCode = StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: Any = None, field: str = ""):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = StatusCode.of(code)
        self.field = field


class ToolError(BridgeError):
    """Raise from a tool to fail the call with a chosen status code (default UNKNOWN).

        raise ToolError("model not loaded", code=StatusCode.FAILED_PRECONDITION)

    (`snakepit_bridge.StatusCode`; `grpc.StatusCode.FAILED_PRECONDITION` works the same.)
    """


class InvalidArgument(BridgeError):
    code = StatusCode.INVALID_ARGUMENT


class NotFound(BridgeError):
    code = StatusCode.NOT_FOUND


class FailedPrecondition(BridgeError):
    code = StatusCode.FAILED_PRECONDITION


class ResourceExhausted(BridgeError):
    code = StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(BridgeError):
    code = StatusCode.DEADLINE_EXCEEDED


class Cancelled(BridgeError):
    code = StatusCode.CANCELLED


class Unavailable(BridgeError):
    code = StatusCode.UNAVAILABLE
