"""Small adapters that the server tests load with `--adapter tests.adapters_for_tests.<Class>`.

They exist to observe the server from the inside: how often `setup()` ran, which instance served a
call, what the request context carried, whether a tool saw its call cancelled.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import numpy as np

from snakepit_bridge import BaseAdapter, RequestContext, StatusCode, ToolError, tool


class SpecAdapter(BaseAdapter):
    """Tools that each pin down one rule of the server."""

    __thread_safe__ = True
    setup_calls = 0  # class-level: counts setup() of every instance in this process

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._cancel_seen: dict[str, dict] = {}
        self.setup_finished_unix = None

    def setup(self) -> None:
        type(self).setup_calls += 1
        time.sleep(0.2)  # a slow model load: readiness must wait for it
        self.setup_finished_unix = time.time()

    def teardown(self) -> None:
        path = os.environ.get("SPEC_ADAPTER_TEARDOWN_FILE")
        if path:
            with open(path, "w") as handle:
                handle.write("teardown\n")

    # --- tools ----------------------------------------------------------------------------------
    @tool
    def noop(self) -> None:
        """Do nothing."""

    @tool(description="The identity of the adapter instance and how often setup() ran in this process")
    def instance_info(self) -> dict:
        return {"instance": id(self), "setup_calls": type(self).setup_calls, "pid": os.getpid(),
                "setup_finished_unix": self.setup_finished_unix, "thread": threading.current_thread().name}

    @tool(description="One parameter of each checked type; returns what it received and the Python types")
    def typed(self, i: int, f: float, flag: bool, s: str, raw: bytes, ints: list[int], mapping: dict,
              arr: np.ndarray, maybe: int | None = None) -> dict:
        values = {"i": i, "f": f, "flag": flag, "s": s, "raw": raw, "ints": ints, "mapping": mapping, "arr": arr,
                  "maybe": maybe}
        return {"values": values, "types": {k: type(v).__name__ for k, v in values.items()}}

    @tool(description="What the request context carries")
    def context_info(self, ctx: RequestContext) -> dict:
        return {"request_id": ctx.request_id, "tool_name": ctx.tool_name, "session_id": ctx.session_id,
                "metadata": dict(ctx.metadata), "time_remaining": ctx.time_remaining, "cancelled": ctx.cancelled,
                "worker_mode": ctx.worker_mode, "has_session": ctx.session is not None,
                "traceparent": ctx.traceparent, "trace_id": ctx.trace_id}

    @tool(description="Wait until the call is cancelled (or `limit` seconds pass); remembers what it saw under `token`")
    def wait_for_cancel(self, token: str, limit: float = 10.0, ctx: RequestContext = None) -> dict:
        started = time.monotonic()
        while not ctx.cancelled and time.monotonic() - started < limit:
            time.sleep(0.01)
        seen = {"cancelled": ctx.cancelled, "waited": time.monotonic() - started}
        with self._lock:
            self._cancel_seen[token] = seen
        return seen

    @tool(description="What wait_for_cancel saw for `token` (null until it returned)")
    def cancel_seen(self, token: str) -> dict | None:
        with self._lock:
            return self._cancel_seen.get(token)

    @tool(description="The value of an environment variable of the server process, or null")
    def environment_variable(self, name: str) -> str | None:
        return os.environ.get(name)

    @tool(description="Sleep without looking at cancellation: an in-flight call that must be drained")
    def stubborn_sleep(self, seconds: float) -> dict:
        started = time.monotonic()
        time.sleep(seconds)
        return {"slept": time.monotonic() - started}

    @tool(description="Raise a ToolError with the named gRPC status code")
    def raise_tool_error(self, code: str, message: str = "tool chose this status") -> None:
        raise ToolError(message, code=StatusCode[code])

    @tool(description="Return something the codec cannot encode")
    def unencodable(self) -> Any:
        return object()

    @tool(description="Return `size` bytes")
    def make_bytes(self, size: int) -> bytes:
        return b"x" * size

    @tool(description="Stream 0..n-1, then return 'done'")
    def countdown(self, n: int):
        for i in range(n):
            yield i
        return "done"

    @tool(description="Stream `before` chunks, then raise")
    def stream_then_fail(self, before: int = 2):
        for i in range(before):
            yield i
        raise RuntimeError(f"stream broke after {before} chunks")

    @tool(description="Write a key of the session state")
    def session_put(self, key: str, value: Any, ctx: RequestContext) -> None:
        if ctx.session is None:
            raise ToolError("needs a session", code=StatusCode.FAILED_PRECONDITION)
        ctx.session.set(key, value)

    @tool(description="Read a key of the session state")
    def session_get(self, key: str, ctx: RequestContext) -> Any:
        if ctx.session is None:
            raise ToolError("needs a session", code=StatusCode.FAILED_PRECONDITION)
        return ctx.session.get(key)

    @tool(description="Return the arguments unchanged")
    def echo(self, **values: Any) -> dict:
        return values

    @tool(description="Raise a BaseException that is not an Exception (KeyboardInterrupt, SystemExit, ...)")
    def raise_base(self, kind: str = "KeyboardInterrupt") -> None:
        raise _BASE_EXCEPTIONS[kind]("raised by raise_base")

    @tool(description="Stream `before` chunks, then raise a BaseException that is not an Exception")
    def stream_then_raise_base(self, before: int = 1, kind: str = "SystemExit"):
        for i in range(before):
            yield i
        raise _BASE_EXCEPTIONS[kind]("raised by stream_then_raise_base")

    @tool(description="Return 10**digits: an integer of digits+1 decimal digits")
    def big_int(self, digits: int) -> int:
        return 10 ** digits

    @tool(description="Return a map with one key of `key_length` characters above a list of `width` zeros")
    def wide_under_long_key(self, key_length: int, width: int) -> dict:
        return {"k" * key_length: [0] * width}

    @tool(description="Return a list nested `depth` levels deep")
    def deep_list(self, depth: int) -> list:
        value: list = []
        for _ in range(depth - 1):
            value = [value]
        return value

    @tool(description="A draw from numpy's legacy global generator (np.random.random)")
    def legacy_random(self) -> float:
        return float(np.random.random())

    @tool(description="Print one line of `size` characters `char` on stdout or stderr")
    def print_line(self, size: int, stream: str = "stdout", char: str = "x") -> None:
        print(char * size, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)

    # --- not tools ----------------------------------------------------------------------------------
    @tool(description="Marked, but private: must never be callable")
    def _private_tool(self) -> str:
        return "private tool ran"

    def unmarked(self) -> str:
        """Public but not marked with @tool: must never be callable."""
        return "unmarked method ran"


class CustomBaseException(BaseException):
    """A BaseException subclass of the adapter's own."""


_BASE_EXCEPTIONS = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit, "GeneratorExit": GeneratorExit,
                    "CustomBaseException": CustomBaseException}


class PreloadedSpecAdapter(SpecAdapter):
    """SpecAdapter that lets the fork server run its setup() once, before it forks (tests/test_forkserver.py).
    teardown() appends its pid to $SPEC_ADAPTER_TEARDOWN_FILE, so a test can count where it ran."""

    __fork_preload__ = True

    def setup(self) -> None:
        super().setup()
        self.initial_weights = np.random.random(4)  # as a model's random initialisation would

    def teardown(self) -> None:
        path = os.environ.get("SPEC_ADAPTER_TEARDOWN_FILE")
        if path:
            with open(path, "a") as handle:
                handle.write(f"{os.getpid()}\n")


class FailingPreloadAdapter(BaseAdapter):
    __thread_safe__ = True
    __fork_preload__ = True

    def setup(self) -> None:
        raise RuntimeError("model file missing")


class FailingSetupAdapter(BaseAdapter):
    __thread_safe__ = True

    def setup(self) -> None:
        raise RuntimeError("model file missing")

    @tool
    def noop(self) -> None:
        pass


def wait_for_a_stop_that_never_comes(never: threading.Event) -> None:
    never.wait()


class NeverEndingThreadAdapter(BaseAdapter):
    """Starts a non-daemon thread that never ends: the interpreter's exit would wait for it forever."""
    __thread_safe__ = True

    def setup(self) -> None:
        self._never = threading.Event()
        threading.Thread(target=wait_for_a_stop_that_never_comes, args=(self._never,), name="never-ends").start()

    @tool
    def noop(self) -> None:
        pass


class UndeclaredAdapter(BaseAdapter):
    """Does not declare __thread_safe__: the threaded server refuses it unless told otherwise."""

    @tool
    def noop(self) -> None:
        pass


class TracedAdapter(SpecAdapter):
    """SpecAdapter with a tool that makes OpenTelemetry spans of its own (tests/test_server_otel.py)."""

    @tool(description="Make `steps` spans of its own under the call's span; return the trace id it saw")
    def traced_steps(self, steps: int = 2) -> str:
        from opentelemetry import trace

        tracer = trace.get_tracer("tests.adapters_for_tests")
        for index in range(steps):
            with tracer.start_as_current_span(f"step {index}"):
                pass
        return format(trace.get_current_span().get_span_context().trace_id, "032x")

    @tool(description="The names of the modules this process has imported that start with `prefix`")
    def imported_modules(self, prefix: str) -> list[str]:
        import sys

        return sorted(name for name in sys.modules if name.startswith(prefix))


class SharedMemoryAdapter(SpecAdapter):
    """SpecAdapter with tools that look at where an argument array's memory comes from (test_server_shm.py)."""

    @tool(description="The types along the array's .base chain, and whether it is writable")
    def array_origin(self, x: np.ndarray) -> dict:
        chain, base = [], x.base
        while base is not None and len(chain) < 8:
            chain.append(type(base).__name__)
            base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
        return {"chain": chain, "writeable": bool(x.flags.writeable)}

    @tool(description="Add 1 to every element in place; return the sum afterwards")
    def increment_in_place(self, x: np.ndarray) -> float:
        x += 1
        return float(x.sum())

    @tool(description="Return an array of `n` float64 ones, then a value the codec cannot encode")
    def big_then_unencodable(self, n: int) -> list:
        return [np.ones(n), object()]

    @tool(description="Stream `count` arrays of `n` float64, each filled with its index")
    def array_chunks(self, count: int, n: int):
        for index in range(count):
            yield np.full(n, float(index))
        return "done"

    @tool(description="Sleep `seconds` holding the argument array, then return its length")
    def hold_array(self, x: np.ndarray, seconds: float) -> int:
        time.sleep(seconds)
        return len(x)
