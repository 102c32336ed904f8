"""BridgeService: the gRPC methods, over one adapter instance.

The control RPCs (Ping, DescribeTools, Heartbeat, GetStats) and the session RPCs are answered here;
each tool call (ExecuteTool, ExecuteStreamingTool, ExecuteBatch) is one `ToolCall` (toolcall.py). A
tool call runs in the grpc handler thread that received it. Everything a tool raises becomes a
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
from dataclasses import dataclass
from typing import Iterator

from ..contract.adapter import BaseAdapter, ToolSpec
from ..contract.errors import InvalidArgument
from ..generated import snakepit_bridge_pb2 as pb
from ..threadsafety.interpreter import gil_enabled
from . import codec
from .calls import CallTracker
from .failures import Stage, failure_for
from .gate import ToolGate
from .logs import REQUEST_ID_CHARS, printable
from .otel import CallTracing
from .shm import RegionDir
from .sessions import SessionStore
from .stats import ServerStats
from .toolcall import ToolCall, end_call

log = logging.getLogger("snakepit_bridge.server")


@dataclass(frozen=True)
class ServerInfo:
    """What the server tells its adapter (`adapter.server_info`)."""

    worker_mode: str
    max_workers: int
    worker_index: int = 0


class BridgeServicer:
    """The methods of BridgeService; a transport (transport_grpcio.py, transport_grpclib.py) serves them."""

    def __init__(self, adapter: BaseAdapter, *, info: ServerInfo, gate: ToolGate, sessions: SessionStore,
                 stats: ServerStats, batch_executor=None, rate_limiter=None, checker=None,
                 adapter_name: str = "", calls: CallTracker | None = None, tracing: CallTracing | None = None,
                 shm: RegionDir | None = None) -> None:
        self.adapter = adapter
        self.info = info
        self.gate = gate
        self.sessions = sessions
        self.stats = stats
        self.batch_executor = batch_executor
        self.rate_limiter = rate_limiter
        self.checker = checker
        self.tracing = tracing  # OpenTelemetry spans of tool calls (otel.py), or None
        self.shm = shm  # --shm-dir: where same-host callers' shared-memory regions are (shm.py), or None
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
                               worker_mode=self.info.worker_mode, adapter=self.adapter_name,
                               shm_dir=self.shm.path if self.shm is not None else "")

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
    # tool execution: one ToolCall per call (toolcall.py)
    def ExecuteTool(self, request, context):
        return ToolCall(self, request, context, "ExecuteTool").unary()

    def ExecuteStreamingTool(self, request, context) -> Iterator[pb.ToolChunk]:
        return ToolCall(self, request, context, "ExecuteStreamingTool").stream()

    def ExecuteBatch(self, request, context):
        return ToolCall(self, request, context, "ExecuteBatch").batch()

    def request_id_for(self, request) -> str:
        """The client's request id, made safe for log lines (printable, bounded), or a new one."""
        if request.request_id:
            return printable(request.request_id, REQUEST_ID_CHARS)
        return self._id_prefix + str(next(self._request_ids))

    @contextlib.contextmanager
    def _errors(self, context):
        """For the cold paths (sessions): failures end the call with their status."""
        try:
            yield
        except Exception as exc:
            end_call(context, failure_for(exc, "", Stage.REQUEST))


def _json_or_error(fn) -> str:
    import json

    try:
        return json.dumps(fn(), default=str)
    except Exception as exc:  # stats must never break GetStats
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})
