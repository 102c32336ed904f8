"""A small Python client for BridgeService, used by tests, benchmarks and Python callers.

    with BridgeClient("127.0.0.1:50052") as client:
        client.execute("add", {"a": 2, "b": 3})          # -> 5
        for chunk in client.stream("progress", {"steps": 3}):
            print(chunk)

The address is any grpc target: `host:port`, or `unix:/path/to/worker.sock` for a server started
with --uds (grpc channels dial Unix sockets themselves).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import grpc

from ..contract.errors import ERROR_TRAILER
from ..generated import snakepit_bridge_pb2 as pb
from ..generated import snakepit_bridge_pb2_grpc as pb_grpc
from . import codec, wire
from .shm import DEFAULT_MIN_BYTES, CallerRegions, RegionDir


class BridgeCallError(Exception):
    """A failed call: the gRPC status, its message, and for tool exceptions the Python error."""

    def __init__(self, code: grpc.StatusCode, message: str, tool_error: pb.ToolError | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.tool_error = tool_error

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "BridgeCallError":
        tool_error = None
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_TRAILER:
                tool_error = pb.ToolError.FromString(value)
        return cls(error.code(), error.details() or "", tool_error)


@dataclass(frozen=True)
class BatchItemResult:
    ok: bool
    value: Any = None
    error: pb.ToolError | None = None


def _serialize(message) -> bytes:
    return message.SerializeToString()  # a protobuf message, or a wire.WireMessage


class BridgeClient:
    """`shm_dir`: the `--shm-dir` of a worker on this host. Bytes and arrays of `shm_min_bytes` or more
    then go both ways as shared-memory regions in it instead of inline (results come back as arrays
    that map the region: no copy); everything else is unchanged."""

    def __init__(self, address: str, *, token: str | None = None, timeout: float | None = 30.0,
                 max_message_mb: float = 64.0, shm_dir: str | None = None,
                 shm_min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        size = int(max_message_mb * 1024 * 1024)
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", size),
                                                               ("grpc.max_send_message_length", size)])
        self.stub = pb_grpc.BridgeServiceStub(self.channel)
        # The two tool-value calls with large blobs serialised once and parsed without copies (wire.py).
        self._execute_tool = self.channel.unary_unary(
            "/snakepit.bridge.BridgeService/ExecuteTool", request_serializer=_serialize,
            response_deserializer=lambda data: wire.split(data, pb.ExecuteToolResponse, 2))
        self._execute_streaming_tool = self.channel.unary_stream(
            "/snakepit.bridge.BridgeService/ExecuteStreamingTool", request_serializer=_serialize,
            response_deserializer=lambda data: wire.split(data, pb.ToolChunk, 3))
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.shm = RegionDir(shm_dir) if shm_dir is not None else None
        self.shm_min_bytes = shm_min_bytes

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BridgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise BridgeCallError.from_rpc_error(error) from None

    def _regions(self) -> CallerRegions | None:
        return CallerRegions(self.shm, self.shm_min_bytes) if self.shm is not None else None

    @staticmethod
    def _request(tool: str, args: dict | None, session_id: str | None, seed: int | None,
                 metadata: dict | None, regions: CallerRegions | None = None) -> Any:
        args_json, blobs = codec.encode(args or {}, regions.arguments if regions is not None else None, views=True)
        request = pb.ExecuteToolRequest(tool_name=tool, args_json=args_json, session_id=session_id or "",
                                        metadata=metadata or {})
        if seed is not None:
            request.seed = seed
        if regions is not None:
            request.shm_result_prefix, request.shm_result_min_bytes = regions.result_prefix, regions.min_bytes
        if sum(memoryview(blob).nbytes for blob in blobs) >= wire.SPLIT_MIN_BYTES:
            return wire.join(request, 3, blobs)  # one copy, straight from the arrays
        request.blobs.extend(bytes(blob) for blob in blobs)
        return request

    def execute(self, tool: str, args: dict | None = None, *, session_id: str | None = None, seed: int | None = None,
                timeout: float | None = None, metadata: dict | None = None) -> Any:
        regions = self._regions()
        failed = True
        try:
            request = self._request(tool, args, session_id, seed, metadata, regions)
            response = self._call(self._execute_tool, request, timeout)
            value = codec.decode(response.result_json, response.blobs, field="result_json", regions=regions)
            failed = False
            return value
        finally:
            if regions is not None:
                regions.finish(failed)

    def stream(self, tool: str, args: dict | None = None, *, session_id: str | None = None, seed: int | None = None,
               timeout: float | None = None, metadata: dict | None = None) -> Iterator[Any]:
        """Yield each chunk's value; the final chunk's value is the generator's return value."""
        regions = self._regions()
        failed = True
        try:
            request = self._request(tool, args, session_id, seed, metadata, regions)
            for chunk in self._execute_streaming_tool(request, timeout=self.timeout if timeout is None else timeout,
                                                      metadata=self.metadata):
                value = codec.decode(chunk.data_json, chunk.blobs, field="data_json", regions=regions)
                if regions is not None:
                    regions.results_read()
                if chunk.is_final:
                    failed = False
                    return value
                yield value
        except grpc.RpcError as error:
            raise BridgeCallError.from_rpc_error(error) from None
        finally:
            if regions is not None:
                regions.finish(failed)

    def batch(self, tool: str, items: list[dict], *, session_id: str | None = None, max_parallelism: int = 0,
              timeout: float | None = None) -> list[BatchItemResult]:
        regions = self._regions()
        failed = True
        try:
            batch_items = []
            for args in items:
                args_json, blobs = codec.encode(args, regions.arguments if regions is not None else None)
                batch_items.append(pb.BatchItem(args_json=args_json, blobs=blobs))
            request = pb.ExecuteBatchRequest(tool_name=tool, items=batch_items, session_id=session_id or "",
                                             max_parallelism=max_parallelism)
            if regions is not None:
                request.shm_result_prefix, request.shm_result_min_bytes = regions.result_prefix, regions.min_bytes
            response = self._call(self.stub.ExecuteBatch, request, timeout)
            results = [BatchItemResult(True, codec.decode(r.result_json, r.blobs, field="result_json",
                                                          regions=regions)) if r.ok
                       else BatchItemResult(False, None, r.error)
                       for r in response.results]
            failed = False
            return results
        finally:
            if regions is not None:
                regions.finish(failed)

    def ping(self, message: str = "") -> pb.PingResponse:
        return self._call(self.stub.Ping, pb.PingRequest(message=message), None)

    def describe_tools(self) -> pb.DescribeToolsResponse:
        return self._call(self.stub.DescribeTools, pb.DescribeToolsRequest(), None)

    def stats(self) -> pb.GetStatsResponse:
        return self._call(self.stub.GetStats, pb.GetStatsRequest(), None)

    def initialize_session(self, session_id: str = "", state: dict | None = None, *, ttl_seconds: int = 0,
                           seed: int | None = None) -> pb.InitializeSessionResponse:
        state_json, blobs = codec.encode(state or {})
        request = pb.InitializeSessionRequest(session_id=session_id, state_json=state_json, blobs=blobs,
                                              ttl_seconds=ttl_seconds)
        if seed is not None:
            request.seed = seed
        return self._call(self.stub.InitializeSession, request, None)

    def get_session_state(self, session_id: str) -> dict:
        response = self._call(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id), None)
        return codec.decode(response.state_json, response.blobs)

    def cleanup_session(self, session_id: str) -> bool:
        return self._call(self.stub.CleanupSession, pb.CleanupSessionRequest(session_id=session_id), None).existed

    def heartbeat(self, session_id: str = "") -> pb.HeartbeatResponse:
        return self._call(self.stub.Heartbeat, pb.HeartbeatRequest(session_id=session_id), None)
