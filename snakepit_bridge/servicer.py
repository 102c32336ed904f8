"""BridgeService: the gRPC methods, over one adapter instance.

The hot path of ExecuteTool: look the tool up, decode and check the arguments, take a slot from the
gate, call the method in this handler thread, encode the result. Everything a tool raises becomes a
structured error; the server keeps serving.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn

import grpc

from . import codec
from .adapter import BaseAdapter, ToolSpec
from .context import RequestContext
from .errors import ERROR_TRAILER, BridgeError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ToolError, Unavailable
from .gate import ToolGate
from .interpreter import gil_enabled
from .generated import snakepit_bridge_pb2 as pb
from .generated import snakepit_bridge_pb2_grpc as pb_grpc
from .logs import request_scope, set_request_id
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
                 adapter_name: str = "") -> None:
        self.adapter = adapter
        self.info = info
        self.gate = gate
        self.sessions = sessions
        self.stats = stats
        self.batch_executor = batch_executor
        self.rate_limiter = rate_limiter
        self.checker = checker
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
            return pb.CleanupSessionResponse(existed=bool(request.session_id) and self.sessions.remove(request.session_id))

    # ---------------------------------------------------------------------------------------------
    # tool execution
    def ExecuteTool(self, request, context):
        request_id = request.request_id or self._new_request_id()
        previous_id = set_request_id(request_id)
        try:
            spec, kwargs, session = self._prepare(request, context, streaming=False)
            started = time.perf_counter()
            failed = True
            try:
                self._admit(context)
                try:
                    self._add_context(kwargs, spec, request, request_id, session, context)
                    try:
                        result = getattr(self.adapter, spec.method_name)(**kwargs)
                    except Exception as exc:
                        self._fail(context, exc, spec.name, from_tool=True)
                    try:
                        result_json, blobs = codec.encode(result)
                    except Exception as exc:
                        self._fail(context, exc, spec.name)
                    failed = False
                finally:
                    self.gate.leave()
            finally:
                elapsed = time.perf_counter() - started
                self.stats.finished(spec.name, elapsed, failed)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("ExecuteTool %s %s in %.3f ms", spec.name, "failed" if failed else "ok", elapsed * 1000)
            response = pb.ExecuteToolResponse(result_json=result_json, request_id=request_id,
                                              duration_ms=elapsed * 1000.0)
            if blobs:
                response.blobs.extend(blobs)
            return response
        finally:
            set_request_id(previous_id)

    def ExecuteStreamingTool(self, request, context) -> Iterator[pb.ToolChunk]:
        request_id = request.request_id or self._new_request_id()
        # The response generator may be resumed between yields; set the request id around each step.
        previous_id = set_request_id(request_id)
        try:
            spec, kwargs, session = self._prepare(request, context, streaming=True)
            started = time.perf_counter()
            failed = True
            chunks = 0
            try:
                self._admit(context)
                try:
                    self._add_context(kwargs, spec, request, request_id, session, context)
                    try:
                        produced = getattr(self.adapter, spec.method_name)(**kwargs)
                        iterator = produced if hasattr(produced, "__next__") else iter(produced)
                    except Exception as exc:
                        self._fail(context, exc, spec.name, from_tool=True)
                    try:
                        while True:
                            try:
                                item = next(iterator)
                            except StopIteration as stop:
                                final_value = stop.value
                                break
                            except Exception as exc:
                                self._fail(context, exc, spec.name, from_tool=True)
                            if not context.is_active():
                                log.info("stream %s cancelled by the client after %d chunks", spec.name, chunks)
                                return
                            try:
                                data_json, blobs = codec.encode(item)
                            except Exception as exc:
                                self._fail(context, exc, spec.name)
                            set_request_id(previous_id)
                            yield pb.ToolChunk(sequence=chunks, data_json=data_json, blobs=blobs)
                            set_request_id(request_id)
                            chunks += 1
                    finally:
                        close = getattr(iterator, "close", None)
                        if close is not None:
                            close()  # runs the generator's finally blocks when the client went away
                    try:
                        data_json, blobs = codec.encode(final_value)
                    except Exception as exc:
                        self._fail(context, exc, spec.name)
                    failed = False
                finally:
                    self.gate.leave()
            finally:
                elapsed = time.perf_counter() - started
                self.stats.finished(spec.name, elapsed, failed)
                log.debug("ExecuteStreamingTool %s %s after %d chunks in %.3f ms", spec.name,
                          "failed" if failed else "ok", chunks, elapsed * 1000)
        finally:
            set_request_id(previous_id)
        yield pb.ToolChunk(sequence=chunks, data_json=data_json, blobs=blobs, is_final=True)

    def ExecuteBatch(self, request, context):
        from .batch import run_batch

        request_id = request.request_id or self._new_request_id()
        with request_scope(request_id):
            with self._errors(context):
                spec = self._lookup(request.tool_name, streaming=False)
                session = self.sessions.get(request.session_id) if request.session_id else None
            deadline = _deadline(context)

            def run_item(item: pb.BatchItem):
                with request_scope(request_id):
                    kwargs = spec.bind(_decode_args(item.args_json, item.blobs))
                    self.stats.started()
                    started = time.perf_counter()
                    failed = True
                    self.gate.enter(deadline, context.is_active, bypass_queue_limit=True)
                    try:
                        if self.rate_limiter is not None:
                            self._rate_limit(deadline)
                        self._add_context(kwargs, spec, request, request_id, session, context)
                        value = getattr(self.adapter, spec.method_name)(**kwargs)
                        encoded = codec.encode(value)
                        failed = False
                        return encoded
                    finally:
                        self.gate.leave()
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
                    exc = outcome.error.exception
                    code = exc.code if isinstance(exc, BridgeError) else grpc.StatusCode.UNKNOWN
                    results.append(pb.BatchResult(ok=False, error=pb.ToolError(
                        code=code.value[0], type=outcome.error.type, message=outcome.error.message,
                        traceback="" if isinstance(exc, BridgeError) and not isinstance(exc, ToolError)
                        else outcome.error.traceback, tool_name=spec.name)))
            return pb.ExecuteBatchResponse(results=results, request_id=request_id)

    # ---------------------------------------------------------------------------------------------
    # helpers
    def _new_request_id(self) -> str:
        return self._id_prefix + str(next(self._request_ids))

    def _lookup(self, tool_name: str, *, streaming: bool) -> ToolSpec:
        spec = self.tools.get(tool_name)
        if spec is None:
            if not tool_name:
                raise InvalidArgument("tool_name is empty", field="tool_name")
            raise NotFound(f"tool '{tool_name}' not found on adapter {self.adapter_name} "
                           f"(tools: {', '.join(sorted(self.tools)) or 'none'})", field="tool_name")
        if spec.streaming and not streaming:
            raise FailedPrecondition(f"tool '{tool_name}' streams; call it with ExecuteStreamingTool", field="tool_name")
        if streaming and not spec.streaming:
            raise FailedPrecondition(f"tool '{tool_name}' does not stream; call it with ExecuteTool", field="tool_name")
        return spec

    def _prepare(self, request: pb.ExecuteToolRequest, context, *, streaming: bool):
        """Look the tool up and check its arguments and session, then count the call as started;
        a refusal ends the call with its status. Returns (spec, kwargs, session)."""
        try:
            if self.stopping.is_set():
                raise Unavailable("server is shutting down")
            spec = self._lookup(request.tool_name, streaming=streaming)
            kwargs = spec.bind(_decode_args(request.args_json, request.blobs))
            session = self.sessions.get(request.session_id) if request.session_id else None
        except Exception as exc:
            self._reject(context, request.tool_name, exc)
        self.stats.started()
        return spec, kwargs, session

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

    def _reject(self, context, tool_name: str, exc: Exception) -> NoReturn:
        """A call refused before it ran: counted, logged at debug level (one line per request), ended."""
        self.stats.rejected()
        log.debug("call to %r rejected: %s", tool_name, exc)
        self._fail(context, exc)

    def _admit(self, context) -> None:
        """Rate limit, then take a gate slot; failures end the call with their status."""
        try:
            deadline = _deadline(context)
            if self.rate_limiter is not None:
                self._rate_limit(deadline)
            self.gate.enter(deadline, context.is_active)
        except Exception as exc:
            self._fail(context, exc)

    def _fail(self, context, exc: Exception, tool: str = "", *, from_tool: bool = False) -> NoReturn:
        """End the call with the status for `exc` (always raises). BridgeErrors keep their code;
        anything else a tool raised is UNKNOWN with a ToolError (type, message, traceback) trailer."""
        if isinstance(exc, AbortedCall):
            raise exc
        if isinstance(exc, BridgeError) and not (from_tool and isinstance(exc, ToolError)):
            abort(context, exc.code, exc.message)
        if isinstance(exc, codec.CodecError):
            if tool:
                abort(context, grpc.StatusCode.INTERNAL, f"tool '{tool}' returned a value that cannot be encoded: {exc}")
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not from_tool:
            log.exception("internal error")
            abort(context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        code = exc.code if isinstance(exc, BridgeError) else grpc.StatusCode.UNKNOWN
        error = pb.ToolError(code=code.value[0], type=type(exc).__name__, message=str(exc),
                             traceback="".join(traceback.format_exception(exc)), tool_name=tool)
        log.warning("tool %s raised %s: %s", tool, type(exc).__name__, exc)
        context.set_trailing_metadata(((ERROR_TRAILER, error.SerializeToString()),))
        abort(context, code, f"tool '{tool}' raised {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _errors(self, context):
        """For the cold paths (sessions, batch set-up): failures end the call with their status."""
        try:
            yield
        except Exception as exc:
            self._fail(context, exc)


class AbortedCall(Exception):
    """Raised after context.abort() so that enclosing error scopes let it pass untouched (grpc's own
    abort raises a bare Exception that cannot be told apart from a tool's)."""


def abort(context, code: grpc.StatusCode, message: str):
    try:
        context.abort(code, message)
    except Exception:
        pass  # grpc marked the call aborted with our code; the exception type is all that changes
    raise AbortedCall(message)


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
        from .rng import RNG, derive_rng

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
