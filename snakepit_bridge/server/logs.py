"""Logging: every line carries the thread name and the current request id.

    2025-10-11 10:30:45,123 - [ThreadPoolExecutor-0_0] - INFO - [a1b-7] Request #7 starting

Text that a client chose (request ids, names, messages passed as log arguments) is made printable
and bounded before it reaches a line: a newline in it cannot forge a log line, and a megabyte of it
cannot make a megabyte line. Tracebacks (`exc_info`) keep their lines.
"""
from __future__ import annotations

import contextvars
import logging
import re

REQUEST_ID_CHARS = 128
LOG_ARGUMENT_CHARS = 1024
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str, limit: int) -> str:
    """`text` with control characters escaped (`\\n`), cut to `limit` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text) - limit} more)"
    if _UNPRINTABLE.search(text):
        text = _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
    return text

LOG_FORMAT = "%(asctime)s - [%(threadName)s] - %(levelname)s - [%(request_id)s] %(message)s"

# The request id of the tool call running in this context. Each call runs in a context of its own
# (toolcall.py), so the id follows it across the handler threads grpc resumes a stream in, and into
# batch items and anything else that copies the context.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("snakepit_request_id", default="-")


# The caller's W3C trace id (tracing.py), when it sent one.
TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("snakepit_trace_id", default="")


def current_request_id() -> str:
    return REQUEST_ID.get()


class RequestIdFilter(logging.Filter):
    """Adds the request id; makes string and exception arguments printable and bounded."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id = TRACE_ID.get()
        record.request_id = f"{REQUEST_ID.get()} trace={trace_id}" if trace_id else REQUEST_ID.get()
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(printable(str(arg), LOG_ARGUMENT_CHARS)
                                if isinstance(arg, (str, BaseException)) else arg for arg in args)
        return True


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()  # stderr: stdout carries only the readiness line
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
