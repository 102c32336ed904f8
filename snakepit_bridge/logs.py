"""Logging: every line carries the thread name and the current request id.

    2025-10-11 10:30:45,123 - [ThreadPoolExecutor-0_0] - INFO - [a1b-7] Request #7 starting
"""
from __future__ import annotations

import contextlib
import logging
import threading

LOG_FORMAT = "%(asctime)s - [%(threadName)s] - %(levelname)s - [%(request_id)s] %(message)s"

_current = threading.local()


def current_request_id() -> str:
    return getattr(_current, "request_id", "-")


def set_request_id(request_id: str) -> str:
    """Make `request_id` current for this thread's log lines; returns the previous one."""
    previous = getattr(_current, "request_id", "-")
    _current.request_id = request_id
    return previous


@contextlib.contextmanager
def request_scope(request_id: str):
    previous = set_request_id(request_id)
    try:
        yield
    finally:
        set_request_id(previous)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()  # stderr: stdout carries only the readiness line
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
