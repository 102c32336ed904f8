"""Adapters for the ThreadSafeAdapter server tests (not part of the racy/safe corpus)."""
from __future__ import annotations

import threading
import time

from snakepit_bridge.adapter import BaseAdapter
from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method, tool


class Undeclared(ThreadSafeAdapter):
    """The guide's pitfall 4: no ``__thread_safe__`` declaration."""

    @tool
    def hello(self) -> str:
        return "hello"


class PlainUndeclared(BaseAdapter):
    """A plain adapter that never heard of threads."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @tool
    def hello(self) -> str:
        self.calls += 1
        return "hello"


class DecoratorOrders(ThreadSafeAdapter):
    """``@thread_safe_method`` above and below ``@tool``, plain and streaming."""

    __thread_safe__ = True

    @thread_safe_method
    @tool(description="tracked, tool inside")
    def outer(self, a: int, b: int = 2) -> int:
        return a * b

    @tool(description="tracked, tool outside")
    @thread_safe_method
    def inner(self, text: str) -> str:
        return text.upper()

    @thread_safe_method
    @tool(description="streaming, tracked")
    def countdown(self, n: int):
        for i in range(n, 0, -1):
            yield i
        return "liftoff"

    @tool(description="streaming, tool outside")
    @thread_safe_method
    def countup(self, n: int):
        for i in range(n):
            yield i


class ThreadLocalCounter(ThreadSafeAdapter):
    """Counts, per pool thread, the requests that thread served (thread-local state)."""

    __thread_safe__ = True

    @thread_safe_method
    @tool
    def served_by_this_thread(self, hold: float = 0.0) -> dict:
        n = self.get_thread_local("served", 0) + 1
        self.set_thread_local("served", n)
        if hold:
            time.sleep(hold)
        return {"thread": threading.current_thread().name, "served": n}
