"""Adapters that the Elixir pool tests load with `python_adapter: "pool_test_adapters.<Class>"`
(the tests put this directory on PYTHONPATH through `adapter_env`).

Each one misbehaves in one way a real adapter can: a tool that ignores cancellation, a setup()
that prints a fake readiness line or floods stdout without a newline, a setup() that raises.
`TraceContextAdapter` instead shows what trace context a call brought, `SharedMemoryAdapter` where
an argument array's memory comes from.
"""
from __future__ import annotations

import mmap
import sys
import time
from typing import Any

import numpy as np

from snakepit_bridge.adapters.showcase import ShowcaseAdapter
from snakepit_bridge import RequestContext
from snakepit_bridge.adapter import tool


class HangingAdapter(ShowcaseAdapter):
    """The showcase tools plus `hang`, which never looks at its deadline or cancellation."""

    @tool(description="Sleep `seconds` in one time.sleep: deaf to deadline and cancellation")
    def hang(self, seconds: float = 3600.0) -> dict:
        time.sleep(seconds)
        return {"slept": seconds}


class FakeReadyLineAdapter(ShowcaseAdapter):
    """setup() prints readiness lines that are not the server's, while it is still loading."""

    def setup(self) -> None:
        print("SNAKEPIT_READY port=1 pid=1", flush=True)
        print("SNAKEPIT_READY port=1 pid=1 nonce=0123456789abcdef0123456789abcdef", flush=True)
        time.sleep(0.5)  # still "loading" when the fake line is read


class FloodingOutputAdapter(ShowcaseAdapter):
    """setup() writes a 64 MiB line with no newline, then carriage-return progress bars, and leaves
    the line unterminated when it returns."""

    def setup(self) -> None:
        chunk = "x" * (1 << 20)
        for _ in range(64):
            sys.stdout.write(chunk)
        for percent in range(0, 101, 5):
            sys.stdout.write(f"\rloading model [{'#' * (percent // 5):<20}] {percent:3d}%")
        sys.stdout.flush()


class BrokenSetupAdapter(ShowcaseAdapter):
    """setup() raises, as a model load that fails does."""

    def setup(self) -> None:
        raise ValueError("model weights missing at /nonexistent/weights.bin")


class TraceContextAdapter(ShowcaseAdapter):
    """The showcase tools plus tools that return the W3C trace context their call carried."""

    @tool(description="The caller's traceparent and trace id as the server saw them (\"\" when none)")
    def trace_context(self, ctx: RequestContext) -> dict:
        return {"traceparent": ctx.traceparent, "trace_id": ctx.trace_id}

    @tool(description="One chunk: the streaming call's trace context")
    def trace_context_stream(self, ctx: RequestContext):
        yield {"traceparent": ctx.traceparent, "trace_id": ctx.trace_id}


class SharedMemoryAdapter(ShowcaseAdapter):
    """The showcase tools plus ones that show whether an argument array came as a shared-memory
    region, and that fail or keep running after their arguments arrived (shm_test.exs)."""

    @tool(description="Whether the array maps a file (a shared-memory region) rather than a copied blob")
    def array_origin(self, x: np.ndarray) -> dict:
        base, mapped = x, False
        for _ in range(8):
            base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
            if base is None:
                break
            mapped = mapped or isinstance(base, mmap.mmap)
        return {"mapped": mapped, "nbytes": int(x.nbytes)}

    @tool(description="Raise a ValueError once the arguments arrived")
    def fail_with(self, x: Any) -> None:
        raise ValueError("failed after its arguments arrived")

    @tool(description="Sleep `seconds` in one time.sleep (deaf to deadline and cancellation), then return x")
    def hold(self, x: Any, seconds: float) -> Any:
        time.sleep(seconds)
        return x

    @tool(description="Stream `count` arrays of `n` float64, each filled with its index; return 'done'")
    def array_chunks(self, count: int, n: int):
        for index in range(count):
            yield np.full(n, float(index))
        return "done"

    @tool(description="Stream one array of `n` float64, then raise")
    def array_then_fail(self, n: int):
        yield np.ones(n)
        raise RuntimeError("failed after its first chunk")

    @tool(description="Return an array of `n` float64 ones and a value that cannot be encoded")
    def big_then_unencodable(self, n: int) -> list:
        return [np.ones(n), object()]


class SlowStartAdapter(ShowcaseAdapter):
    """setup() takes a second, as loading a model does: a replacement worker is a while coming."""

    def setup(self) -> None:
        time.sleep(1.0)
