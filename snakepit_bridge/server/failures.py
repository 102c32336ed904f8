"""How a tool call ends when it fails: one mapping from what went wrong to the status the caller sees.

ExecuteTool, ExecuteStreamingTool and every ExecuteBatch item go through `failure_for`, so the same
bad input gets the same code and message on every path. Everything the server echoes back (names,
messages, tracebacks) passes through `safe_text` here: escaped so it always encodes as UTF-8 (a lone
surrogate arrives easily as a JSON escape) and bounded so it fits the caller's metadata limits.
"""
from __future__ import annotations

import logging
import traceback
from enum import Enum

from ..contract.errors import BridgeError, StatusCode, ToolError
from ..generated import snakepit_bridge_pb2 as pb
from . import codec

log = logging.getLogger("snakepit_bridge.server")

# Status messages and ToolError texts travel in HTTP/2 headers (grpc-message, snakepit-error-bin);
# grpcio clients refuse header blocks past 8 KiB, so what the server echoes stays well under it.
MESSAGE_BYTES = 1024
TRACEBACK_BYTES = 2048
NAME_CHARS = 64  # a name the client chose (tool, argument, session), as echoed in a message


class Stage(Enum):
    REQUEST = "request"  # looking up, decoding, checking, admitting: nothing of the tool ran yet
    TOOL = "tool"        # the tool's own code raised
    RESULT = "result"    # the tool returned a value that cannot be encoded


def safe_text(text: str, max_bytes: int = MESSAGE_BYTES, *, keep: str = "head") -> str:
    """`text` made valid UTF-8 (lone surrogates become `\\udxxx` escapes) and cut to `max_bytes`,
    keeping its head (messages) or its tail (tracebacks, whose last lines matter most)."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    note = f" ...({len(data) - max_bytes} bytes cut)... "
    room = max(0, max_bytes - len(note))
    if keep == "tail":
        return note.lstrip() + data[-room:].decode("utf-8", "ignore")
    return data[:room].decode("utf-8", "ignore") + note.rstrip()


def short_name(name: str) -> str:
    """A client-chosen name as a message quotes it: escaped and at most NAME_CHARS characters."""
    text = safe_text(name, NAME_CHARS * 4)
    return text if len(text) <= NAME_CHARS else f"{text[:NAME_CHARS - 3]}... ({len(name)} characters)"


def undecodable_request(message_type: str, error: Exception) -> str:
    """The INVALID_ARGUMENT message for request bytes that do not parse as `message_type` (both transports)."""
    return f"request is not a valid {message_type} message: {safe_text(str(error), 256)}"


class CallFailure(Exception):
    """A failed call as the caller will see it: status code, message, and for an exception raised by
    the tool, the ToolError (type, message, traceback) sent in the trailing metadata."""

    def __init__(self, code: StatusCode, message: str, *, error_type: str = "",
                 tool_error: pb.ToolError | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = safe_text(message)
        self.error_type = error_type
        self.tool_error = tool_error

    def as_tool_error(self, tool_name: str) -> pb.ToolError:
        """The ToolError of a batch item."""
        if self.tool_error is not None:
            return self.tool_error
        return pb.ToolError(code=self.code.value[0], type=self.error_type, message=self.message, tool_name=tool_name)


def failure_for(exc: BaseException, tool: str, stage: Stage) -> CallFailure:
    """The failure the caller sees for `exc`, raised at `stage` of a call to `tool`."""
    if isinstance(exc, CallFailure):
        return exc
    kind = type(exc).__name__
    if stage is Stage.TOOL and not (isinstance(exc, BridgeError) and not isinstance(exc, ToolError)):
        # Anything the tool raised, BaseExceptions too (SystemExit must not end a serving thread).
        code = exc.code if isinstance(exc, ToolError) else StatusCode.UNKNOWN
        text = str(exc)
        log.warning("tool %s raised %s: %s", tool, kind, text)
        tool_error = pb.ToolError(code=code.value[0], type=kind, message=safe_text(text),
                                  traceback=safe_text("".join(traceback.format_exception(exc)), TRACEBACK_BYTES,
                                                      keep="tail"),
                                  tool_name=tool)
        return CallFailure(code, f"tool '{tool}' raised {kind}: {text}", error_type=kind, tool_error=tool_error)
    if isinstance(exc, BridgeError):
        return CallFailure(exc.code, exc.message, error_type=kind)
    if isinstance(exc, codec.CodecError):
        if stage is Stage.RESULT:
            return CallFailure(StatusCode.INTERNAL,
                               f"tool '{tool}' returned a value that cannot be encoded: {exc}", error_type=kind)
        return CallFailure(StatusCode.INVALID_ARGUMENT, str(exc), error_type=kind)
    log.error("internal error%s", f" in a call to {tool}" if tool else "", exc_info=exc)
    return CallFailure(StatusCode.INTERNAL, f"internal error: {kind}: {exc}", error_type=kind)
