"""Admission of tool calls: at most `max_concurrent` run at once, at most `max_queue` wait.

The threaded server admits `--max-workers` calls at once; the process server admits one. A call that
finds the queue full is RESOURCE_EXHAUSTED at once; a queued call gives up at its deadline
(DEADLINE_EXCEEDED) or when its client cancels (CANCELLED). Control RPCs (Ping, health, stats) never
pass through the gate, so they are answered even when every slot is busy.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ..contract.errors import Cancelled, DeadlineExceeded, ResourceExhausted

_POLL_SECONDS = 0.05  # how often a queued call re-checks whether its client is still there


class ToolGate:
    def __init__(self, max_concurrent: int, max_queue: int, on_queue_change: Callable[[int], None] | None = None):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        # Calls take and give back slots under `_lock` itself, not `with _cond`: the same lock without
        # Condition's Python-level __enter__/__exit__ on every call's way in and out.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._on_queue_change = on_queue_change or (lambda delta: None)

    def enter(self, deadline: float | None = None, is_active: Callable[[], bool] | None = None,
              bypass_queue_limit: bool = False) -> None:
        """Take a slot, waiting in the queue if needed. `deadline` is a time.monotonic() value."""
        with self._lock:
            if self.running < self.max_concurrent and self.waiting == 0:
                self.running += 1
                return
            if not bypass_queue_limit and self.waiting >= self.max_queue:
                raise ResourceExhausted(
                    f"server busy: {self.running} tool calls running and {self.waiting} queued "
                    f"(max-queue {self.max_queue}); retry later")
            self.waiting += 1
            self._on_queue_change(1)
            try:
                while self.running >= self.max_concurrent:
                    timeout = _POLL_SECONDS
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise DeadlineExceeded("deadline exceeded while queued for a free worker slot")
                        timeout = min(timeout, remaining)
                    self._cond.wait(timeout)
                    if is_active is not None and self.running >= self.max_concurrent and not is_active():
                        raise Cancelled("call cancelled while queued")
                self.running += 1
            finally:
                self.waiting -= 1
                self._on_queue_change(-1)

    def leave(self) -> None:
        with self._lock:
            self.running -= 1
            if self.waiting:
                self._cond.notify()
