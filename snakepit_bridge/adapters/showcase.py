"""ShowcaseAdapter: small, real tools that show each feature of the bridge.

    grpcurl -plaintext -d '{"tool_name": "add", "args_json": "{\"a\": 2, \"b\": 3}"}' \
        127.0.0.1:50052 snakepit.bridge.BridgeService/ExecuteTool
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..contract.adapter import BaseAdapter, tool
from ..contract.context import RequestContext
from ..contract.errors import StatusCode, ToolError
from ..toolkit.rng import RNG

MAX_STEPS = 100_000
MAX_STEP_DELAY = 60.0  # seconds


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Bad input is the caller's error: INVALID_ARGUMENT naming the argument, not a tool crash."""
    if not low <= value <= high:
        raise ToolError(f"{name} must be within {low:g}..{high:g}, got {value:g}",
                        code=StatusCode.INVALID_ARGUMENT)


def sleep_unless_cancelled(seconds: float, ctx: RequestContext | None) -> bool:
    """Sleep up to `seconds` in short slices, stopping as soon as the call is cancelled; True if it was."""
    end = time.monotonic() + seconds
    while (remaining := end - time.monotonic()) > 0:
        if ctx is not None and ctx.cancelled:
            return True
        time.sleep(min(remaining, 0.01))
    return ctx is not None and ctx.cancelled


class ShowcaseAdapter(BaseAdapter):
    # Its tools keep no mutable state on the instance, so threads may share it.
    __thread_safe__ = True

    @tool(description="Answer 'pong' with the worker's pid; a cheap liveness and routing check")
    def ping(self, message: str = "pong") -> dict:
        return {"message": message, "pid": os.getpid()}

    @tool(description="Return the arguments unchanged: a round trip for every value type")
    def echo(self, **values: Any) -> dict:
        return values

    @tool(description="Add two numbers (integers stay integers)")
    def add(self, a: int | float, b: int | float) -> int | float:
        return a + b

    @tool(description="Sleep, then report how long; returns early with cancelled=true if the call is cancelled")
    def sleep(self, seconds: float, ctx: RequestContext) -> dict:
        check_range("seconds", seconds, 0, 3600)
        started = time.monotonic()
        cancelled = sleep_unless_cancelled(seconds, ctx)
        return {"slept": time.monotonic() - started, "cancelled": cancelled}

    @tool(description="Raise an exception of the given kind: shows structured errors")
    def fail(self, message: str = "requested failure", kind: str = "ValueError") -> None:
        errors = {"ValueError": ValueError, "RuntimeError": RuntimeError, "KeyError": KeyError,
                  "ZeroDivisionError": ZeroDivisionError}
        if kind not in errors:
            raise ValueError(f"kind must be one of {sorted(errors)}, got {kind!r}")
        raise errors[kind](message)

    @tool(description="Stream progress: one chunk per step, then a summary as the final chunk")
    def progress(self, steps: int = 5, delay: float = 0.0, ctx: RequestContext | None = None):
        check_range("steps", steps, 0, MAX_STEPS)
        check_range("delay", delay, 0, MAX_STEP_DELAY)
        for step in range(1, steps + 1):
            if (delay and sleep_unless_cancelled(delay, ctx)) or (ctx is not None and ctx.cancelled):
                return {"completed": step - 1, "cancelled": True}
            yield {"step": step, "total": steps, "percent": round(100.0 * step / steps, 1)}
        return {"completed": steps, "cancelled": False}

    @tool(description="Statistics of a numeric array; returns them with the array normalised to mean 0, std 1")
    def array_stats(self, values: np.ndarray) -> dict:
        array = np.asarray(values, dtype=np.float64)
        if array.size == 0:
            raise ValueError("values must not be empty")
        std = float(array.std())
        normalized = (array - array.mean()) / std if std else np.zeros_like(array)
        return {"mean": float(array.mean()), "std": std, "min": float(array.min()), "max": float(array.max()),
                "shape": list(array.shape), "normalized": normalized}

    @tool(description="Multiply two matrices")
    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"cannot multiply shapes {a.shape} and {b.shape}")
        return a @ b

    @tool(description="Random numbers from the request's RNG: reproducible for a given seed")
    def random_numbers(self, count: int = 5, ctx: RequestContext | None = None) -> list[float]:
        check_range("count", count, 0, 1_000_000)
        rng = ctx.rng if ctx is not None else RNG()  # called directly, outside a server: OS entropy
        return [rng.uniform(0.0, 1.0) for _ in range(count)]

    @tool(description="Count calls within a session (state kept in the session)")
    def session_counter(self, ctx: RequestContext, increment: int = 1) -> int:
        if ctx.session is None:
            raise ValueError("session_counter needs a session_id (call InitializeSession first)")
        return ctx.session.update(lambda state: state.update(count=state.get("count", 0) + increment))["count"]
