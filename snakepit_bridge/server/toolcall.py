"""One tool call, from request to response: the same life for ExecuteTool, ExecuteStreamingTool and
every item of an ExecuteBatch.

    prepare   count it on its connection, refuse it while stopping, look the tool up, check the
              arguments and the session (nothing of the tool runs yet)
    admitted  rate limit, take a gate slot (or wait in the queue), count it, give the slot back
    run       call the tool with its RequestContext, encode what it returns

Every failure on the way is a `CallFailure` (failures.py decides its status); `failures()` ends the
RPC with it, in one place. The call's request id lives in a `contextvars.Context` of its own, and
every step of the call runs inside it: log lines of the call carry the id in whatever handler thread
grpc resumes a stream in, and batch items (which copy the context) carry it too.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Generator, Iterator, NoReturn

from ..contract.context import RequestContext
from ..contract.errors import (
    ERROR_TRAILER,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatusCode,
    Unavailable,
)
from ..generated import snakepit_bridge_pb2 as pb
from . import codec, tracing, wire
from .failures import CallFailure, Stage, failure_for, safe_text, short_name
from .logs import REQUEST_ID, TRACE_ID
from .sessions import Session
from .wire import SplitMessage
from .shm import RegionDir, RegionError, ResultRegions

if TYPE_CHECKING:
    from ..contract.adapter import ToolSpec
    from .servicer import BridgeServicer

log = logging.getLogger("snakepit_bridge.server")


class Slot:
    """A call's place in the gate while it runs (`with call.admitted() as slot:`): counted from entry,
    rate limited, then holding a gate slot; on exit the slot goes back and the outcome is counted, failed
    when the body raised or set `slot.failed`. A class, not a generator: it is on every call's hot path."""

    __slots__ = ("call", "bypass_queue_limit", "span", "held", "failed", "started", "elapsed")

    def __init__(self, call: ToolCall, bypass_queue_limit: bool, span: Any) -> None:
        self.call = call
        self.bypass_queue_limit = bypass_queue_limit
        self.span = span  # the OpenTelemetry span that the admission is an event of, or None
        self.held = False
        self.failed = False  # set by a body that ends early without raising (a stream whose client left)
        self.started = 0.0
        self.elapsed = 0.0

    def __enter__(self) -> Slot:
        call = self.call
        call.server.stats.started()
        self.started = time.perf_counter()
        try:
            if call.server.rate_limiter is not None:
                call.rate_limit()
            call.enter_gate(bypass_queue_limit=self.bypass_queue_limit)
        except BaseException as exc:
            code = exc.code.name if isinstance(exc, CallFailure) else "CANCELLED"
            call.server.stats.refused(code)
            self._finish(failed=True, code=code)
            raise
        self.held = True
        if self.span is not None:
            self.span.add_event("admitted", {"snakepit.queue_wait_ms": (time.perf_counter() - self.started) * 1000})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish(failed=self.failed, code="CANCELLED" if self.failed else "OK")
        else:
            self._finish(failed=True, code=exc.code.name if isinstance(exc, CallFailure) else "CANCELLED")

    def _finish(self, failed: bool, code: str = "") -> None:
        call = self.call
        if self.held:
            self.held = False
            call.server.gate.leave()
        self.elapsed = time.perf_counter() - self.started
        assert call.spec is not None
        call.server.stats.finished(call.spec.name, self.elapsed, failed, code)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s in %.3f ms", call.method, call.spec.name, "failed" if failed else "ok",
                      self.elapsed * 1000)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Give the slot back while a stream's chunk waits for its reader (a slow reader, or one that
        never reads, holds no slot another call could use); take it again, past the queue, after."""
        self.call.server.gate.leave()
        self.held = False
        yield  # an exception here (the client went away) ends the call without taking the slot again
        self.call.enter_gate(bypass_queue_limit=True)
        self.held = True


class EndOnFailure:
    """`with call.failures():` a CallFailure raised inside ends the RPC with its status (and is kept as
    the call's `failure`, which its span ends with)."""

    __slots__ = ("call",)

    def __init__(self, call: ToolCall) -> None:
        self.call = call

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is CallFailure:
            self.call.failure = exc
            end_call(self.call.context, exc)


class ToolCall:
    """One call of one tool; see the module docstring for its stages."""

    __slots__ = ("server", "request", "context", "method", "request_id", "scope", "trace", "deadline", "spec",
                 "kwargs", "session", "connection", "span", "failure", "results")

    def __init__(self, server: BridgeServicer, request, context, method: str) -> None:
        self.server = server
        self.request = request
        self.context = context
        self.method = method
        self.request_id = server.request_id_for(request)
        self.scope = contextvars.copy_context()
        self.scope.run(REQUEST_ID.set, self.request_id)
        self.trace = tracing.from_context(context)
        if self.trace is not None:
            self.scope.run(TRACE_ID.set, self.trace.trace_id)
        self.deadline = _deadline(context)
        self.spec: ToolSpec | None = None
        self.kwargs: dict[str, Any] = {}
        self.session: Session | None = None
        self.connection: Any = None  # calls.TrackedCall: its send watchdog
        self.failure: CallFailure | None = None  # how the call failed, once it has
        self.results: ResultRegions | None = None  # shared-memory regions for large results, when asked
        self.span: Any = None  # its OpenTelemetry span (otel.py), when spans are on
        if server.tracing is not None:
            self.span = server.tracing.start(self)
            if self.trace is None:  # a root span: its trace id is the one to find the log lines by
                self.scope.run(TRACE_ID.set, server.tracing.trace_id(self.span))

    # --- the three RPCs --------------------------------------------------------------------------
    def unary(self) -> pb.ExecuteToolResponse:
        if self.span is None:
            return self.scope.run(self._unary)
        return self.scope.run(self._in_span, self._unary)

    def stream(self) -> Iterator[pb.ToolChunk]:
        return _steps_in(self.scope, self._stream() if self.span is None else self._stream_in_span())

    def batch(self) -> pb.ExecuteBatchResponse:
        if self.span is None:
            return self.scope.run(self._batch)
        return self.scope.run(self._in_span, self._batch)

    def _in_span(self, rpc):
        """`rpc()`, its span ended with how it ended."""
        try:
            response = rpc()
        except BaseException as exc:
            self.end_span(exc)
            raise
        self.end_span(None)
        return response

    def _stream_in_span(self) -> Generator[pb.ToolChunk, None, None]:
        try:
            yield from self._stream()
        except GeneratorExit:  # the client went away at a yield
            self.failure = self.failure or CallFailure(StatusCode.CANCELLED, "the client went away")
            self.end_span(None)
            raise
        except BaseException as exc:
            self.end_span(exc)
            raise
        self.end_span(None)

    def end_span(self, exc: BaseException | None) -> None:
        """End the call's span with its failure (or `exc`, when no CallFailure ended it), else OK."""
        failure, tracing = self.failure, self.server.tracing
        assert tracing is not None
        if failure is not None:
            tracing.end(self.span, failure.code, failure.message)
        elif exc is not None:
            tracing.end(self.span, StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        else:
            tracing.end(self.span, StatusCode.OK)

    def _unary(self) -> pb.ExecuteToolResponse:
        with self.failures():
            self.prepare(streaming=False)
            with self.admitted() as slot:
                result_json, blobs = self.run(self.kwargs, views=True)
        self.kwargs = {}  # the arguments' memory can go before the response is sent
        response = _with_blobs(pb.ExecuteToolResponse(result_json=result_json, request_id=self.request_id,
                                                      duration_ms=slot.elapsed * 1000.0), 2, blobs)
        self.connection.sending()  # from here grpc sends; the send watchdog ends the call if the client never reads
        return response

    def _stream(self) -> Generator[pb.ToolChunk, None, None]:
        with self.failures():
            self.prepare(streaming=True)
        spec = self.spec
        assert spec is not None
        chunks = 0
        with self.failures(), self.admitted() as slot:
            produced = self.start_stream()
            try:
                while True:
                    done, item = _next_chunk(produced, spec.name)
                    if done:
                        break
                    if not self.context.is_active():
                        log.info("stream %s cancelled by the client after %d chunks", spec.name, chunks)
                        slot.failed = True
                        self.failure = CallFailure(StatusCode.CANCELLED, f"cancelled by the client after {chunks} "
                                                   "chunks")
                        return
                    data_json, blobs = _encode_result(item, spec.name, self.results, views=True)
                    chunk = _with_blobs(pb.ToolChunk(sequence=chunks, data_json=data_json), 3, blobs)
                    del item, blobs
                    with slot.released():
                        self.connection.sending()
                        yield chunk
                        self.connection.sent()
                    chunks += 1
                final_json, final_blobs = _encode_result(item, spec.name, self.results, views=True)  # returned
            finally:
                close = getattr(produced, "close", None)
                if close is not None:
                    close()  # runs the generator's finally blocks when the client went away
        self.connection.sending()
        yield _with_blobs(pb.ToolChunk(sequence=chunks, data_json=final_json, is_final=True), 3, final_blobs)

    def _batch(self) -> pb.ExecuteBatchResponse:
        from ..toolkit.batch import run_batch

        with self.failures():
            self.prepare(streaming=False, bind_args=False)  # each item binds its own arguments
        spec = self.spec
        assert spec is not None

        def run_item(indexed: tuple[int, pb.BatchItem]) -> tuple[str, list[bytes]]:
            index, item = indexed
            if self.span is not None:
                return self.run_item_in_span(index, item)
            kwargs = self.bind(item)
            with self.admitted(bypass_queue_limit=True):  # the batch passed the queue once
                return self.run(kwargs)

        parallelism = self.server.info.max_workers
        if self.request.max_parallelism:
            parallelism = min(parallelism, self.request.max_parallelism)
        outcomes = run_batch(run_item, list(enumerate(self.request.items)), parallelism,
                             executor=self.server.batch_executor)
        results = []
        for outcome in outcomes:
            if outcome.ok:
                result_json, blobs = outcome.value
                results.append(pb.BatchResult(ok=True, result_json=result_json, blobs=blobs))
            else:
                assert outcome.error is not None and outcome.error.exception is not None
                failure = failure_for(outcome.error.exception, spec.name, Stage.REQUEST)
                results.append(pb.BatchResult(ok=False, error=failure.as_tool_error(spec.name)))
        if self.span is not None:
            self.span.set_attribute("snakepit.batch.failed", sum(not outcome.ok for outcome in outcomes))
        self.connection.sending()
        return pb.ExecuteBatchResponse(results=results, request_id=self.request_id)

    def run_item_in_span(self, index: int, item: pb.BatchItem) -> tuple[str, list[bytes]]:
        """A batch item with a span of its own, current while its tool runs (in the item's own context)."""
        tracing = self.server.tracing
        assert tracing is not None
        span = tracing.start_item(self, index)
        tracing.make_current(span)
        try:
            kwargs = self.bind(item)
            with self.admitted(bypass_queue_limit=True, span=span):
                result = self.run(kwargs)
        except CallFailure as failure:
            tracing.end(span, failure.code, failure.message)
            raise
        except BaseException as exc:
            tracing.end(span, StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
            raise
        tracing.end(span, StatusCode.OK)
        return result

    # --- the stages ------------------------------------------------------------------------------
    def failures(self) -> EndOnFailure:
        """A CallFailure raised inside ends the RPC with its status."""
        return EndOnFailure(self)

    def prepare(self, *, streaming: bool, bind_args: bool = True) -> None:
        """Everything checked before the tool runs; a refusal is counted and raised as its CallFailure."""
        server = self.server
        try:
            self.connection = server.calls.begin(self.context, self.method)
        except ResourceExhausted as exc:
            failure = failure_for(exc, "", Stage.REQUEST)
            server.stats.rejected(self.known_tool(), failure.code.name)
            raise failure from None
        request = self.request
        try:
            if server.stopping.is_set():
                raise Unavailable("server is shutting down")
            self.spec = self.lookup(request.tool_name, streaming=streaming)
            if bind_args:
                self.kwargs = self.spec.bind(_decode_args(request, server.shm))
                if type(request) is SplitMessage:
                    request.release_blobs()  # decoded (copied): the received message can be freed
            self.session = server.sessions.get(request.session_id) if request.session_id else None
            if request.shm_result_prefix and server.shm is not None:  # without --shm-dir: results inline
                self.results = _result_regions(server.shm, request)
        except Exception as exc:
            raise self.refusal(exc) from None

    def lookup(self, tool_name: str, *, streaming: bool) -> ToolSpec:
        server = self.server
        spec = server.tools.get(tool_name)
        if spec is None:
            if not tool_name:
                raise InvalidArgument("tool_name is empty", field="tool_name")
            known = ", ".join(sorted(server.tools)) or "none"
            raise NotFound(f"tool '{short_name(tool_name)}' not found on adapter {server.adapter_name} "
                           f"(tools: {safe_text(known, 512)})", field="tool_name")
        if spec.streaming and not streaming:
            raise FailedPrecondition(f"tool '{tool_name}' streams; call it with ExecuteStreamingTool",
                                     field="tool_name")
        if streaming and not spec.streaming:
            raise FailedPrecondition(f"tool '{tool_name}' does not stream; call it with ExecuteTool", field="tool_name")
        return spec

    def bind(self, item: pb.BatchItem) -> dict[str, Any]:
        """A batch item's arguments, checked against the tool's signature."""
        assert self.spec is not None
        try:
            return self.spec.bind(_decode_args(item, self.server.shm))
        except Exception as exc:
            raise self.refusal(exc) from None

    def refusal(self, exc: Exception) -> CallFailure:
        """A call refused before it ran: counted, logged at debug level (one line per request)."""
        failure = failure_for(exc, "", Stage.REQUEST)
        self.server.stats.rejected(self.known_tool(), failure.code.name)
        log.debug("call to %r rejected: %s", self.request.tool_name, exc)
        return failure

    def known_tool(self) -> str:
        """The tool's name when the adapter has it, else "" (a client's made-up names are no label)."""
        name = self.request.tool_name
        return name if name in self.server.tools else ""

    def admitted(self, *, bypass_queue_limit: bool = False, span: Any = None) -> Slot:
        """The call counted, rate limited and holding a gate slot inside the `with`; see `Slot`."""
        return Slot(self, bypass_queue_limit, span if span is not None else self.span)

    def rate_limit(self) -> None:
        """Wait for the server's rate limiter (the caller checked that there is one)."""
        limiter = self.server.rate_limiter
        assert limiter is not None
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if not limiter.acquire(timeout=timeout):
            wait = limiter.time_until_available()
            raise failure_for(ResourceExhausted(
                f"rate limit exceeded: {limiter.rate:g} calls/s (burst {limiter.burst:g}); "
                f"the next token frees up in {wait:.2f} s, after the call's deadline ({timeout or 0:.2f} s left)"),
                "", Stage.REQUEST)

    def enter_gate(self, *, bypass_queue_limit: bool = False) -> None:
        """Take a gate slot, or raise the CallFailure of a full queue, a deadline or a cancellation."""
        try:
            self.server.gate.enter(self.deadline, self.context.is_active, bypass_queue_limit=bypass_queue_limit)
        except Exception as exc:
            raise failure_for(exc, "", Stage.REQUEST) from None

    def run(self, kwargs: dict[str, Any], *, views: bool = False) -> tuple[str, list[bytes]]:
        """Run the tool and encode its result; whatever the tool raises becomes its CallFailure."""
        assert self.spec is not None
        self.add_context(kwargs)
        try:
            result = getattr(self.server.adapter, self.spec.method_name)(**kwargs)
        except BaseException as exc:  # KeyboardInterrupt or SystemExit from a tool must not end a handler thread
            raise failure_for(exc, self.spec.name, Stage.TOOL) from None
        return _encode_result(result, self.spec.name, self.results, views=views)

    def start_stream(self) -> Iterator[Any]:
        assert self.spec is not None
        self.add_context(self.kwargs)
        try:
            produced = getattr(self.server.adapter, self.spec.method_name)(**self.kwargs)
            return produced if hasattr(produced, "__next__") else iter(produced)
        except BaseException as exc:
            raise failure_for(exc, self.spec.name, Stage.TOOL) from None

    def add_context(self, kwargs: dict[str, Any]) -> None:
        """Pass the frozen request context to tools that take one."""
        spec, request, context, server = self.spec, self.request, self.context, self.server
        assert spec is not None
        if spec.context_parameter is None:
            return
        # ExecuteBatchRequest has no seed: batch items draw from the session's seed or OS entropy.
        seed = (request.seed if request.DESCRIPTOR is pb.ExecuteToolRequest.DESCRIPTOR and request.HasField("seed")
                else None)
        kwargs[spec.context_parameter] = RequestContext(
            request_id=self.request_id, tool_name=spec.name, session_id=request.session_id,
            metadata=dict(request.metadata), deadline=_deadline(context), session=self.session, seed=seed,
            worker_mode=server.info.worker_mode, is_active=lambda: context.is_active() and not server.stopping.is_set(),
            rng_factory=_rng_factory(seed, self.session, self.request_id),
            traceparent=self.trace.header if self.trace is not None else "")


def end_call(context, failure: CallFailure) -> NoReturn:
    """End the RPC with `failure`'s status (and its ToolError in the trailing metadata). Raises."""
    if failure.tool_error is not None:
        context.set_trailing_metadata(((ERROR_TRAILER, failure.tool_error.SerializeToString()),))
    context.abort(transport_code(failure.code), failure.message)
    raise AssertionError("unreachable: context.abort raises")


def transport_code(code: StatusCode):
    """`code` as the serving transport's `abort` takes it: grpcio's takes only its own enum (and is
    loaded whenever it serves); the grpclib transport's context takes either."""
    grpc = sys.modules.get("grpc")
    return getattr(grpc.StatusCode, code.name) if grpc is not None else code


def _steps_in(scope: contextvars.Context, steps: Generator[pb.ToolChunk, None, None]) -> Iterator[pb.ToolChunk]:
    """`steps`, each one run inside the call's context: grpc may resume a stream in another handler
    thread, and the call's context goes with it instead of being set and reset around every yield."""
    try:
        while True:
            try:
                chunk = scope.run(next, steps)
            except StopIteration:
                return
            yield chunk
    finally:
        scope.run(steps.close)  # the client went away at a yield: the call's finally blocks, in its context


def _next_chunk(iterator: Iterator[Any], tool: str) -> tuple[bool, Any]:
    """(False, chunk), or (True, the generator's return value) once it is exhausted."""
    try:
        return False, next(iterator)
    except StopIteration as stop:
        return True, stop.value
    except BaseException as exc:
        raise failure_for(exc, tool, Stage.TOOL) from None


def _encode_result(value: Any, tool: str, regions: ResultRegions | None = None, *,
                   views: bool = False) -> tuple[str, list[bytes]]:
    try:
        return codec.encode(value, regions, views=views)
    except Exception as exc:
        raise failure_for(exc, tool, Stage.RESULT) from None


def _result_regions(directory: RegionDir, request) -> ResultRegions:
    try:
        return ResultRegions(directory, request.shm_result_prefix, request.shm_result_min_bytes)
    except RegionError as exc:
        raise InvalidArgument(str(exc), field="shm_result_prefix") from None


def _with_blobs(message, blob_field: int, blobs: list) -> Any:
    """`message` with `blobs` (bytes or views of arrays) in its blob field: added by protobuf when they
    are small, else serialised once, straight from their memory (wire.py)."""
    if not blobs:
        return message
    if sum(memoryview(blob).nbytes for blob in blobs) < wire.SPLIT_MIN_BYTES:
        getattr(message, message.DESCRIPTOR.fields_by_number[blob_field].name).extend(
            blob if type(blob) is bytes else bytes(blob) for blob in blobs)
        return message
    return wire.join(message, blob_field, blobs)


def _decode_args(message, regions: RegionDir | None = None) -> dict[str, Any]:
    """The arguments of a request or a batch item (its `args_json` and `blobs`)."""
    args_json = message.args_json
    if args_json in _NO_ARGS:  # before `message.blobs`: protobuf builds that container on every access
        return {}
    args = codec.decode(args_json, message.blobs, field="args_json", regions=regions)
    if not isinstance(args, dict):
        raise InvalidArgument(f"args_json must be a JSON object of arguments, got {type(args).__name__}",
                              field="args_json")
    return args


_NO_ARGS = ("", "{}")


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return time.monotonic() + remaining


def _rng_factory(seed: int | None, session: Session | None, request_id: str):
    def build():
        from ..toolkit.rng import RNG, derive_rng

        if seed is not None:
            return derive_rng(seed, "request")
        if session is not None and session.seed is not None:
            return derive_rng(session.seed, session.id, session.next_request_number())
        return RNG()

    return build
