"""A raw HTTP/2 gRPC client (on `h2`) for tests that must misbehave as no real gRPC client would:
open calls and never grant flow-control window, or send bytes that no protobuf library would write.

    with RawGrpcConnection("127.0.0.1", port, initial_window=0) as conn:
        stream = conn.start_call("/snakepit.bridge.BridgeService/ExecuteStreamingTool", request_bytes)
        conn.pump(1.0)                          # read frames for a second, grant nothing
        conn.stream_ended(stream)               # did the server end (or reset) the stream?
"""
from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.settings


class RawGrpcConnection:
    def __init__(self, host: str, port: int, *, initial_window: int = 65535) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.initiate_connection()
        self.authority = f"{host}:{port}"
        self.ended: dict[int, str] = {}          # stream id -> "trailers" | "reset"
        self.trailers: dict[int, dict] = {}
        self.data_bytes: dict[int, int] = {}
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start_call(self, path: str, message: bytes, metadata: dict[str, str] | None = None) -> int:
        """Open a stream for `path` and send one length-prefixed message with END_STREAM."""
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
                   ("content-type", "application/grpc"), ("te", "trailers")]
        headers += list((metadata or {}).items())
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        self._flush()
        return stream_id

    def pump(self, seconds: float) -> None:
        """Read and handle frames for `seconds` without acknowledging any received DATA."""
        deadline = time.monotonic() + seconds
        while not self.closed and (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(min(remaining, 0.2))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                self.closed = True
                break
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.data_bytes[event.stream_id] = self.data_bytes.get(event.stream_id, 0) + len(event.data)
                elif isinstance(event, h2.events.TrailersReceived):
                    self.trailers[event.stream_id] = dict(event.headers)
                    self.ended[event.stream_id] = "trailers"
                elif isinstance(event, h2.events.ResponseReceived) and event.stream_ended:
                    self.trailers[event.stream_id] = dict(event.headers)  # trailers-only response
                    self.ended[event.stream_id] = "trailers"
                elif isinstance(event, h2.events.StreamReset):
                    self.ended[event.stream_id] = "reset"
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = True
            self._flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except Exception:
            pass
        self.sock.close()

    def __enter__(self) -> "RawGrpcConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
