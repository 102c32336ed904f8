"""BridgeService: the gRPC methods, over one adapter instance.

The hot path of ExecuteTool: look the tool up, decode and check the arguments, take a slot from the
gate, call the method in this handler thread, encode the result. Everything a tool raises becomes a
structured error; the server keeps serving.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn

import grpc

from ..contract.adapter import BaseAdapter, ToolSpec
from ..contract.context import RequestContext
from ..contract.errors import (
    ERROR_TRAILER,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ..generated import snakepit_bridge_pb2 as pb
from ..generated import snakepit_bridge_pb2_grpc as pb_grpc
from ..threadsafety.interpreter import gil_enabled
from . import codec
from .calls import CallTracker
from .failures import CallFailure, Stage, failure_for, safe_text, short_name
from .gate import ToolGate
from .logs import REQUEST_ID_CHARS, printable, request_scope, set_request_id
from .sessions import Session, SessionStore
from .stats import ServerStats

log = logging.getLogger("snakepit_bridge.server")


@dataclass(frozen=True)
class ServerInfo:
    """What the server tells its adapter (`adapter.server_info`)."""

    worker_mode: str
    max_workers: int
    worker_index: int = 0


class BridgeServicer(pb_grpc.BridgeServiceServicer):
    def __init__(self, adapter: BaseAdapter, *, info: ServerInfo, gate: ToolGate, sessions: SessionStore,
                 stats: ServerStats, batch_executor=None, rate_limiter=None, checker=None,
                 adapter_name: str = "", calls: CallTracker | None = None) -> None:
        self.adapter = adapter
        self.info = info
        self.gate = gate
        self.sessions = sessions
        self.stats = stats
        self.batch_executor = batch_executor
        self.rate_limiter = rate_limiter
        self.checker = checker
        # Without limits of its own (in-process use): no per-connection cap, no send watchdog.
        self.calls = calls if calls is not None else CallTracker(max_per_connection=2 ** 31, send_timeout=None)
        self.adapter_name = adapter_name or f"{type(adapter).__module__}.{type(adapter).__qualname__}"
        self.tools: dict[str, ToolSpec] = type(adapter).tool_specs()
        self.stopping = threading.Event()
        self._request_ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-"

    # ---------------------------------------------------------------------------------------------
    # control RPCs: never gated
    def Ping(self, request, context):
        return pb.PingResponse(message=request.message, server_time_unix_ms=int(time.time() * 1000), pid=os.getpid(),
                               worker_mode=self.info.worker_mode, adapter=self.adapter_name)

    def DescribeTools(self, request, context):
        tools = []
        for spec in self.tools.values():
            params = [pb.ParameterSpec(name=p.name, type=p.type_name, required=p.required, default_json=p.default_json,
                                       description=p.description) for p in spec.parameters]
            tools.append(pb.ToolSpec(name=spec.name, description=spec.description, parameters=params,
                                     supports_streaming=spec.streaming))
        return pb.DescribeToolsResponse(tools=tools, adapter=self.adapter_name)

    def Heartbeat(self, request, context):
        alive = False
        if request.session_id:
            alive = self.sessions.find(request.session_id) is not None
        return pb.HeartbeatResponse(server_time_unix_ms=int(time.time() * 1000), serving=not self.stopping.is_set(),
                                    session_alive=alive)

    def GetStats(self, request, context):
        stats = self.stats
        response = pb.GetStatsResponse(
            requests_total=stats.requests_total, requests_active=stats.requests_active,
            requests_failed=stats.requests_failed, requests_queued=stats.requests_queued,
            threads=threading.active_count(), max_workers=self.info.max_workers,
            uptime_seconds=stats.uptime_seconds, worker_mode=self.info.worker_mode, gil_enabled=gil_enabled(),
            python_version=sys.version.split()[0], pid=os.getpid(), sessions_active=len(self.sessions),
            tools=[pb.ToolStats(**row) for row in stats.tool_rows()],
        )
        adapter_stats = getattr(self.adapter, "get_stats", None)
        if callable(adapter_stats):
            response.adapter_stats_json = _json_or_error(adapter_stats)
        if self.checker is not None:
            response.thread_safety_json = _json_or_error(self.checker.get_report)
        return response

    # ---------------------------------------------------------------------------------------------
    # sessions
    def InitializeSession(self, request, context):
        with self._errors(context):
            state = codec.decode(request.state_json, request.blobs, field="state_json") if request.state_json else {}
            if not isinstance(state, dict):
                raise InvalidArgument("state_json must be a JSON object", field="state_json")
            session, created = self.sessions.create(
                request.session_id, state=state, ttl_seconds=request.ttl_seconds,
                seed=request.seed if request.HasField("seed") else None, metadata=dict(request.metadata))
            return pb.InitializeSessionResponse(session_id=session.id, created=created,
                                                ttl_seconds=int(session.ttl_seconds))

    def GetSession(self, request, context):
        with self._errors(context):
            session = self.sessions.get(request.session_id)
            state_json, blobs = codec.encode(session.snapshot())
            return pb.GetSessionResponse(
                session_id=session.id, state_json=state_json, blobs=blobs, created_at_unix_ms=session.created_at_ms,
                last_used_unix_ms=session.last_used_ms, request_count=session.request_count,
                ttl_seconds=int(session.ttl_seconds), metadata=session.metadata)

    def CleanupSession(self, request, context):
        with self._errors(context):
            if request.session_id:
                self.sessions.validate_id(request.session_id)
            existed = bool(request.session_id) and self.sessions.remove(request.session_id)
            return pb.CleanupSessionResponse(existed=existed)

    # ---------------------------------------------------------------------------------------------
    # tool execution
    def ExecuteTool(self, request, context):
        request_id = self._request_id(request)
        previous_id = set_request_id(request_id)
        try:
            call = self._begin(context, "ExecuteTool")
            spec, kwargs, session = self._prepare(request, streaming=False)
            self.stats.started()
            started = time.perf_counter()
            failed = True
            try:
                self._admit(context)
                try:
                    self._add_context(kwargs, spec, request, request_id, session, context)
                    result_json, blobs = self._invoke(spec, kwargs)
                finally:
                    self.gate.leave()
                failed = False
            finally:
                elapsed = time.perf_counter() - started
                self.stats.finished(spec.name, elapsed, failed)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("ExecuteTool %s %s in %.3f ms", spec.name, "failed" if failed else "ok", elapsed * 1000)
        except CallFailure as failure:
            end_call(context, failure)
        finally:
            set_request_id(previous_id)
        response = pb.ExecuteToolResponse(result_json=result_json, request_id=request_id, duration_ms=elapsed * 1000.0)
        if blobs:
            response.blobs.extend(blobs)
        call.sending()  # from here grpc sends; the send watchdog ends the call if the client never reads
        return response

    def ExecuteStreamingTool(self, request, context) -> Iterator[pb.ToolChunk]:
        request_id = self._request_id(request)
        # The response generator may be resumed in another handler thread between yields; the request
        # id is set around each step.
        previous_id = set_request_id(request_id)
        failure = None
        try:
            call = self._begin(context, "ExecuteStreamingTool")
            spec, kwargs, session = self._prepare(request, streaming=True)
        except CallFailure as refused:
            set_request_id(previous_id)
            end_call(context, refused)
        self.stats.started()
        started = time.perf_counter()
        failed = True
        chunks = 0
        iterator = None
        try:
            deadline = self._admit(context)
            holding_slot = True
            try:
                self._add_context(kwargs, spec, request, request_id, session, context)
                iterator = self._start_stream(spec, kwargs)
                while True:
                    done, item = self._next_chunk(iterator, spec.name)
                    if done:
                        break
                    if not context.is_active():
                        log.info("stream %s cancelled by the client after %d chunks", spec.name, chunks)
                        return
                    data_json, blobs = _encode_result(item, spec.name)
                    # While a chunk travels the tool is suspended: its slot goes back to the gate, so a
                    # client that reads slowly (or never) holds no slot another call could use.
                    self.gate.leave()
                    holding_slot = False
                    call.sending()
                    set_request_id(previous_id)
                    yield pb.ToolChunk(sequence=chunks, data_json=data_json, blobs=blobs)
                    set_request_id(request_id)
                    call.sent()
                    chunks += 1
                    self._enter_gate(deadline, context, bypass_queue_limit=True)  # it passed the queue once
                    holding_slot = True
                final_json, final_blobs = _encode_result(item, spec.name)
                failed = False
            finally:
                if iterator is not None:
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()  # runs the generator's finally blocks when the client went away
                if holding_slot:
                    self.gate.leave()
        except CallFailure as raised:
            failure = raised
        finally:
            elapsed = time.perf_counter() - started
            self.stats.finished(spec.name, elapsed, failed)
            log.debug("ExecuteStreamingTool %s %s after %d chunks in %.3f ms", spec.name,
                      "failed" if failed else "ok", chunks, elapsed * 1000)
            set_request_id(previous_id)
        if failure is not None:
            end_call(context, failure)
        call.sending()
        yield pb.ToolChunk(sequence=chunks, data_json=final_json, blobs=final_blobs, is_final=True)

    def ExecuteBatch(self, request, context):
        from ..toolkit.batch import run_batch

        request_id = self._request_id(request)
        with request_scope(request_id):
            try:
                call = self._begin(context, "ExecuteBatch")
                spec, _, session = self._prepare(request, streaming=False, bind_args=False)  # items bind their own
            except CallFailure as failure:
                end_call(context, failure)
            deadline = _deadline(context)

            def run_item(item: pb.BatchItem):
                with request_scope(request_id):
                    try:
                        kwargs = spec.bind(_decode_args(item.args_json, item.blobs))
                    except Exception as exc:
                        raise self._refusal(spec.name, exc) from None
                    self.stats.started()
                    started = time.perf_counter()
                    failed = True
                    try:
                        # Items of an admitted batch wait for slots, never for queue places.
                        self._enter_gate(deadline, context, bypass_queue_limit=True)
                        try:
                            if self.rate_limiter is not None:
                                self._rate_limit(deadline)
                            self._add_context(kwargs, spec, request, request_id, session, context)
                            encoded = self._invoke(spec, kwargs)
                        finally:
                            self.gate.leave()
                        failed = False
                        return encoded
                    finally:
                        self.stats.finished(spec.name, time.perf_counter() - started, failed)

            parallelism = self.info.max_workers
            if request.max_parallelism:
                parallelism = min(parallelism, request.max_parallelism)
            outcomes = run_batch(run_item, list(request.items), parallelism, executor=self.batch_executor)
            results = []
            for outcome in outcomes:
                if outcome.ok:
                    result_json, blobs = outcome.value
                    results.append(pb.BatchResult(ok=True, result_json=result_json, blobs=blobs))
                else:
                    assert outcome.error is not None and outcome.error.exception is not None
                    item_failure = failure_for(outcome.error.exception, spec.name, Stage.REQUEST)
                    results.append(pb.BatchResult(ok=False, error=item_failure.as_tool_error(spec.name)))
            call.sending()
            return pb.ExecuteBatchResponse(results=results, request_id=request_id)

    # ---------------------------------------------------------------------------------------------
    # helpers
    def _request_id(self, request) -> str:
        """The client's request id, made safe for log lines (printable, bounded), or a new one."""
        if request.request_id:
            return printable(request.request_id, REQUEST_ID_CHARS)
        return self._id_prefix + str(next(self._request_ids))

    def _begin(self, context, method: str):
        try:
            return self.calls.begin(context, method)
        except ResourceExhausted as exc:
            self.stats.rejected()
            raise failure_for(exc, "", Stage.REQUEST) from None

    def _lookup(self, tool_name: str, *, streaming: bool) -> ToolSpec:
        spec = self.tools.get(tool_name)
        if spec is None:
            if not tool_name:
                raise InvalidArgument("tool_name is empty", field="tool_name")
            known = ", ".join(sorted(self.tools)) or "none"
            raise NotFound(f"tool '{short_name(tool_name)}' not found on adapter {self.adapter_name} "
                           f"(tools: {safe_text(known, 512)})", field="tool_name")
        if spec.streaming and not streaming:
            raise FailedPrecondition(f"tool '{tool_name}' streams; call it with ExecuteStreamingTool",
                                     field="tool_name")
        if streaming and not spec.streaming:
            raise FailedPrecondition(f"tool '{tool_name}' does not stream; call it with ExecuteTool", field="tool_name")
        return spec

    def _prepare(self, request, *, streaming: bool, bind_args: bool = True):
        """Look the tool up and check its arguments (unless `bind_args` is false: a batch's items bind
        their own) and session; returns (spec, kwargs, session) or raises the CallFailure of a refused call."""
        try:
            if self.stopping.is_set():
                raise Unavailable("server is shutting down")
            spec = self._lookup(request.tool_name, streaming=streaming)
            kwargs = spec.bind(_decode_args(request.args_json, request.blobs)) if bind_args else {}
            session = self.sessions.get(request.session_id) if request.session_id else None
        except Exception as exc:
            raise self._refusal(request.tool_name, exc) from None
        return spec, kwargs, session

    def _refusal(self, tool_name: str, exc: Exception) -> CallFailure:
        """A call refused before it ran: counted, logged at debug level (one line per request)."""
        self.stats.rejected()
        log.debug("call to %r rejected: %s", tool_name, exc)
        return failure_for(exc, "", Stage.REQUEST)

    def _invoke(self, spec: ToolSpec, kwargs: dict) -> tuple[str, list[bytes]]:
        """Run the tool and encode its result; whatever the tool raises becomes its CallFailure."""
        try:
            result = getattr(self.adapter, spec.method_name)(**kwargs)
        except BaseException as exc:  # KeyboardInterrupt or SystemExit from a tool must not end a handler thread
            raise failure_for(exc, spec.name, Stage.TOOL) from None
        return _encode_result(result, spec.name)

    def _start_stream(self, spec: ToolSpec, kwargs: dict):
        try:
            produced = getattr(self.adapter, spec.method_name)(**kwargs)
            return produced if hasattr(produced, "__next__") else iter(produced)
        except BaseException as exc:
            raise failure_for(exc, spec.name, Stage.TOOL) from None

    @staticmethod
    def _next_chunk(iterator, tool: str) -> tuple[bool, Any]:
        """(False, chunk), or (True, the generator's return value) once it is exhausted."""
        try:
            return False, next(iterator)
        except StopIteration as stop:
            return True, stop.value
        except BaseException as exc:
            raise failure_for(exc, tool, Stage.TOOL) from None

    def _add_context(self, kwargs: dict, spec: ToolSpec, request, request_id: str, session: Session | None,
                     context) -> None:
        """Pass the frozen request context to tools that take one."""
        if spec.context_parameter is None:
            return
        # ExecuteBatchRequest has no seed: batch items draw from the session's seed or OS entropy.
        seed = request.seed if isinstance(request, pb.ExecuteToolRequest) and request.HasField("seed") else None
        kwargs[spec.context_parameter] = RequestContext(
            request_id=request_id, tool_name=spec.name, session_id=request.session_id,
            metadata=dict(request.metadata), deadline=_deadline(context), session=session, seed=seed,
            worker_mode=self.info.worker_mode, is_active=lambda: context.is_active() and not self.stopping.is_set(),
            rng_factory=_rng_factory(seed, session, request_id))

    def _rate_limit(self, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.rate_limiter.acquire(timeout=timeout):
            wait = self.rate_limiter.time_until_available()
            raise ResourceExhausted(
                f"rate limit exceeded: {self.rate_limiter.rate:g} calls/s (burst {self.rate_limiter.burst:g}); "
                f"the next token frees up in {wait:.2f} s, after the call's deadline ({timeout or 0:.2f} s left)")

    def _admit(self, context) -> float | None:
        """Rate limit, then take a gate slot; returns the call's deadline, or raises its CallFailure."""
        try:
            deadline = _deadline(context)
            if self.rate_limiter is not None:
                self._rate_limit(deadline)
        except Exception as exc:
            raise failure_for(exc, "", Stage.REQUEST) from None
        self._enter_gate(deadline, context)
        return deadline

    def _enter_gate(self, deadline: float | None, context, *, bypass_queue_limit: bool = False) -> None:
        """Take a gate slot, or raise the CallFailure of a full queue, a deadline or a cancellation."""
        try:
            self.gate.enter(deadline, context.is_active, bypass_queue_limit=bypass_queue_limit)
        except Exception as exc:
            raise failure_for(exc, "", Stage.REQUEST) from None

    @contextlib.contextmanager
    def _errors(self, context):
        """For the cold paths (sessions): failures end the call with their status."""
        try:
            yield
        except Exception as exc:
            end_call(context, failure_for(exc, "", Stage.REQUEST))


def end_call(context, failure: CallFailure) -> NoReturn:
    """End the RPC with `failure`'s status (and its ToolError in the trailing metadata). Raises."""
    if failure.tool_error is not None:
        context.set_trailing_metadata(((ERROR_TRAILER, failure.tool_error.SerializeToString()),))
    context.abort(failure.code, failure.message)
    raise AssertionError("unreachable: context.abort raises")


def _encode_result(value: Any, tool: str) -> tuple[str, list[bytes]]:
    try:
        return codec.encode(value)
    except Exception as exc:
        raise failure_for(exc, tool, Stage.RESULT) from None


def _decode_args(args_json: str, blobs) -> dict[str, Any]:
    if not args_json:
        return {}
    args = codec.decode(args_json, blobs, field="args_json")
    if not isinstance(args, dict):
        raise InvalidArgument(f"args_json must be a JSON object of arguments, got {type(args).__name__}",
                              field="args_json")
    return args


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


def _json_or_error(fn) -> str:
    import json

    try:
        return json.dumps(fn(), default=str)
    except Exception as exc:  # stats must never break GetStats
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})


class UndecodableRequest:
    """What the lenient deserializer hands the handler instead of raising: grpcio would turn a
    deserializer's exception into INTERNAL, but bytes that are not the request message are the
    client's error."""

    __slots__ = ("message_type", "error")

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error


def _lenient(message_class) -> Callable[[bytes], Any]:
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # google.protobuf.message.DecodeError, or invalid UTF-8 in a string field
            return UndecodableRequest(name, exc)

    return deserialize


def _refuse_undecodable(behaviour: Callable) -> Callable:
    # The same wrapper serves unary and streaming methods: a streaming behaviour's generator is
    # returned untouched.
    @functools.wraps(behaviour)
    def checked(request, context):
        if type(request) is UndecodableRequest:
            reason = safe_text(str(request.error), 256)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request is not a valid {request.message_type} message: {reason}")
        return behaviour(request, context)

    return checked


def add_servicer_to_server(servicer: BridgeServicer, server: grpc.Server) -> None:
    """Register BridgeService like the generated `add_BridgeServiceServicer_to_server`, with request
    bytes that do not parse answered INVALID_ARGUMENT (naming the message type) instead of INTERNAL."""
    service = pb.DESCRIPTOR.services_by_name["BridgeService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behaviour = _refuse_undecodable(getattr(servicer, method.name))
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=_lenient(request_class),
                                     response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
