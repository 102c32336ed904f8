"""The per-call request context a tool may take as a parameter (`ctx: RequestContext`).

It is frozen (`toolkit.frozen.Frozen`): assigning to or deleting its attributes raises `FrozenError`.
What a tool may change lives in the session state (`ctx.session`) or in its return value.
`ctx.cancelled` turns true when the client cancels, the deadline passes or the server begins shutting
down.
"""
from __future__ import annotations

import threading
import time
import types
from typing import Any, Callable, Mapping

from ..toolkit.frozen import Frozen


class RequestContext(Frozen, frozen_hint="keep state in ctx.session or return it"):
    __slots__ = ("request_id", "tool_name", "session_id", "metadata", "deadline", "session", "seed",
                 "worker_mode", "traceparent", "_is_active", "_rng", "_rng_factory", "_rng_lock")

    request_id: str
    tool_name: str
    session_id: str
    metadata: Mapping[str, str]
    deadline: float | None  # time.monotonic() value, None when the call has no deadline
    session: Any  # snakepit_bridge.sessions.Session or None
    seed: int | None
    worker_mode: str
    traceparent: str  # the caller's W3C traceparent header when it sent a valid one, else ""
    _is_active: Callable[[], bool]
    _rng: Any
    _rng_factory: Callable[[], Any] | None
    _rng_lock: threading.Lock

    def __init__(self, *, request_id: str, tool_name: str, session_id: str = "",
                 metadata: Mapping[str, str] | None = None,
                 deadline: float | None = None, session: Any = None, seed: int | None = None,
                 worker_mode: str = "", is_active: Callable[[], bool] | None = None,
                 rng_factory: Callable[[], Any] | None = None, traceparent: str = "") -> None:
        # Built once per call: set the slots directly, not through Frozen's checked __setattr__ (it
        # freezes once __init__ returns).
        setter = object.__setattr__
        setter(self, "request_id", request_id)
        setter(self, "tool_name", tool_name)
        setter(self, "session_id", session_id)
        setter(self, "metadata", types.MappingProxyType(dict(metadata or {})))
        setter(self, "deadline", deadline)
        setter(self, "session", session)
        setter(self, "seed", seed)
        setter(self, "worker_mode", worker_mode)
        setter(self, "traceparent", traceparent)
        setter(self, "_is_active", is_active or (lambda: True))
        setter(self, "_rng", None)
        setter(self, "_rng_factory", rng_factory)
        setter(self, "_rng_lock", threading.Lock())

    @property
    def time_remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def trace_id(self) -> str:
        """The caller's trace id (32 hex digits), or "" when the call came without a traceparent."""
        return self.traceparent[3:35] if self.traceparent else ""

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled, the deadline passed, or the server is shutting down."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return not self._is_active()

    @property
    def rng(self):
        """This request's `snakepit_bridge.rng.RNG`: reproducible from the request's seed (or the
        session's seed and the request's number within the session); OS entropy without a seed."""
        rng = self._rng
        if rng is None:
            with self._rng_lock:
                rng = self._rng
                if rng is None:
                    from ..toolkit.rng import RNG

                    rng = self._rng_factory() if self._rng_factory else RNG()
                    object.__setattr__(self, "_rng", rng)   # the one lazy slot, set past the freeze
        return rng

    def __repr__(self) -> str:
        return (f"RequestContext(request_id={self.request_id!r}, tool_name={self.tool_name!r}, "
                f"session_id={self.session_id!r}, time_remaining={self.time_remaining!r})")
