"""A small Python client for BridgeService, used by tests, benchmarks and Python callers.

    with BridgeClient("127.0.0.1:50052") as client:
        client.execute("add", {"a": 2, "b": 3})          # -> 5
        for chunk in client.stream("progress", {"steps": 3}):
            print(chunk)

The address is any grpc target: `host:port`, or `unix:/path/to/worker.sock` for a server started
with --uds (grpc channels dial Unix sockets themselves).

A server started with `--tls-cert/--tls-key` is called over TLS, its certificate verified against a CA,
and one with `--tls-client-ca` (mTLS) also wants the client's certificate and key:

    BridgeClient("127.0.0.1:50052", tls_ca="ca.pem", tls_cert="client.pem", tls_key="client-key.pem")
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


# What grpc's UNAVAILABLE details say when the handshake, not the network, failed.
# "Socket closed": under TLS 1.3 a server that refuses the client's certificate (or its lack) closes the
# connection after the client has finished its side of the handshake.
TLS_FAILURE_WORDS = ("handshake", "CERTIFICATE_VERIFY_FAILED", "certificate", "SSL", "TLS", "verification",
                     "Socket closed", "Connection reset")


@dataclass(frozen=True)
class ClientTls:
    """The client's side of the server's --tls-* flags, PEM files read once."""

    ca_path: str | None
    cert_path: str | None
    server_name: str | None
    ca: bytes | None
    cert: bytes | None
    key: bytes | None

    @classmethod
    def of(cls, tls: bool | None, ca: str | None, cert: str | None, key: str | None,
           server_name: str | None) -> "ClientTls | None":
        if tls is None:
            tls = any(value is not None for value in (ca, cert, key, server_name))
        if not tls:
            if any(value is not None for value in (ca, cert, key, server_name)):
                raise ValueError("tls=False with tls_* options: drop them, or leave tls unset")
            return None
        if (cert is None) != (key is None):
            raise ValueError("tls_cert and tls_key go together: the client certificate and its private key")
        return cls(ca, cert, server_name, _read_pem("tls_ca", ca), _read_pem("tls_cert", cert),
                   _read_pem("tls_key", key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def explain(self) -> str:
        trusted = f"the CA in {self.ca_path}" if self.ca_path else "the system's CA certificates"
        name = f"the name {self.server_name!r}" if self.server_name else "the address's host (or give tls_server_name)"
        ours = (f"; or the server refused this client's certificate {self.cert_path}" if self.cert_path
                else "; or the server requires a client certificate (give tls_cert and tls_key)")
        return f"the server's certificate must verify against {trusted} and carry {name}{ours}"


def _read_pem(name: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ValueError(f"{name} {path}: cannot read it: {exc.strerror or exc}") from None


def _serialize(message) -> bytes:
    return message.SerializeToString()  # a protobuf message, or a wire.WireMessage


class BridgeClient:
    """`shm_dir`: the `--shm-dir` of a worker on this host. Bytes and arrays of `shm_min_bytes` or more
    then go both ways as shared-memory regions in it instead of inline (results come back as arrays
    that map the region: no copy); everything else is unchanged."""

    def __init__(self, address: str, *, token: str | None = None, timeout: float | None = 30.0,
                 max_message_mb: float = 64.0, shm_dir: str | None = None,
                 shm_min_bytes: int = DEFAULT_MIN_BYTES, tls: bool | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None) -> None:
        """TLS (on when `tls` is True or any `tls_*` is given): `tls_ca`, the PEM CA file the server's
        certificate must verify against (default: the system's roots); `tls_cert`/`tls_key`, this
        client's certificate and key for a server with --tls-client-ca; `tls_server_name`, the name
        the certificate must carry when it is not the address's host."""
        size = int(max_message_mb * 1024 * 1024)
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", size),
                                          ("grpc.max_send_message_length", size)]
        self.tls = ClientTls.of(tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self.address = address
        if self.tls is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, self.tls.credentials(), options=options + self.tls.options())
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
            raise self._error(error) from None

    def _error(self, error: grpc.RpcError) -> BridgeCallError:
        failure = BridgeCallError.from_rpc_error(error)
        if self.tls is not None and failure.code == grpc.StatusCode.UNAVAILABLE and \
                any(word in failure.message for word in TLS_FAILURE_WORDS):
            failure = BridgeCallError(failure.code, f"TLS connection to {self.address} failed: "
                                      f"{self.tls.explain()} ({failure.message})", failure.tool_error)
        return failure

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
            raise self._error(error) from None
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
