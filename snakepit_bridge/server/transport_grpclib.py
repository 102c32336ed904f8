"""The grpclib transport: BridgeService, health and reflection on grpclib (pure Python, HTTP/2 by h2),
for free-threaded builds, where grpcio has no wheel and re-enables the GIL when imported.

One asyncio loop in a thread of its own does the I/O (HTTP/2 frames, message parsing); every call of
the servicer runs on a thread pool, exactly as grpcio's handler threads run it, through a context
object with the part of grpcio's `ServicerContext` the servicer uses. So there is one servicer and
one tool-call path (toolcall.py) behind both transports. With the GIL off, the pool's threads run
tool calls truly in parallel.

Differences from grpcio, kept small on purpose: a request over --max-message-mb is refused once it has
arrived (grpcio refuses it while it arrives), the listening socket is made here (SO_REUSEPORT for
--processes, as grpcio's `grpc.so_reuseport`; a Unix socket for --uds), and each client connection to a
Unix socket has a name of its own (grpcio calls every one of them `unix:`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable

from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.reflection.service import ServerReflection, _ServerReflectionV1Alpha
from grpclib.server import Server

from ..contract.errors import StatusCode
from ..generated import snakepit_bridge_pb2 as pb
from . import wire
from .failures import undecodable_request
from .unix_socket import owner_only_umask

if TYPE_CHECKING:
    from .auth import BearerToken
    from .endpoint import Endpoint
    from .worker import Worker

log = logging.getLogger("snakepit_bridge.server")

SERVICE = pb.DESCRIPTOR.services_by_name["BridgeService"]
_END = object()  # what next() returns once a stream's chunks are exhausted


class Aborted(Exception):
    """Raised by `CallContext.abort` in a pool thread; the loop ends the RPC with its status."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = StatusCode.of(code)
        self.message = message


class CallContext:
    """What the servicer needs of an RPC, as grpcio's ServicerContext offers it, over a grpclib stream.
    Called from pool threads; everything that touches the stream goes through the loop."""

    __slots__ = ("_stream", "_loop", "_task", "_deadline", "_peer", "active", "trailing", "_callbacks")

    def __init__(self, stream, loop: asyncio.AbstractEventLoop, task: asyncio.Task | None) -> None:
        self._stream = stream
        self._loop = loop
        self._task = task
        self._deadline = stream.deadline
        self._peer = _peer_name(stream)
        self.active = True
        self.trailing: tuple = ()
        self._callbacks: list[Callable[[], None]] = []

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline.time_remaining())

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return tuple(self._stream.metadata.items()) if self._stream.metadata else ()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def abort(self, code, message: str):
        raise Aborted(code, message)

    def cancel(self) -> None:
        """End the RPC now (the send watchdog's verdict on a client that does not read): RST_STREAM to
        the client, then the handler is cancelled."""
        self.active = False
        asyncio.run_coroutine_threadsafe(self._reset(), self._loop)

    async def _reset(self) -> None:
        try:
            await self._stream.cancel()
        except Exception:  # already reset, or the connection is gone
            pass
        if self._task is not None:
            self._task.cancel()

    def finished(self) -> None:
        self.active = False
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("an RPC's done callback failed")


def _peer_name(stream) -> str:
    try:
        address = stream.peer.addr()
    except Exception:
        return "unknown"
    if not isinstance(address, tuple):
        # A Unix socket's client has no address (''). The peer is what --max-calls-per-connection counts
        # by, so name the connection itself: its transport lives as long as any of its calls.
        return f"unix:connection-{id(getattr(stream.peer, '_transport', None)):x}"
    host, port = address[:2]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class LimitedProtoCodec(ProtoCodec):
    """Messages over the size limit are RESOURCE_EXHAUSTED, bytes that do not parse INVALID_ARGUMENT
    (naming the message type), as on the grpcio transport."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def encode(self, message, message_type) -> bytes:
        # a wire.WireMessage is serialised already (large blobs, straight from their memory)
        data = message.data if type(message) is wire.WireMessage else super().encode(message, message_type)
        if len(data) > self.max_bytes:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"response of {len(data)} bytes is over the limit of {self.max_bytes} (--max-message-mb)")
        return data

    def decode(self, data: bytes, message_type):
        if len(data) > self.max_bytes:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"received message larger than max ({len(data)} vs. {self.max_bytes})")
        try:
            blob_field = wire.REQUEST_BLOB_FIELDS.get(message_type.DESCRIPTOR.full_name)
            if blob_field is not None:  # large blobs stay in the received bytes
                return wire.split(data, message_type, blob_field)
            return super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            undecodable_request(message_type.DESCRIPTOR.full_name, exc)) from None


class BridgeService:
    """BridgeService's methods for grpclib, each running the servicer's method on the pool."""

    def __init__(self, servicer, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.servicer = servicer
        self.pool = pool

    def __mapping__(self) -> dict[str, Handler]:
        mapping = {}
        for method in SERVICE.methods:
            behaviour = getattr(self.servicer, method.name)
            request_type = getattr(pb, method.input_type.name)
            response_type = getattr(pb, method.output_type.name)
            if method.server_streaming:
                async def handle(stream, behaviour=behaviour):
                    await self._serve_stream(stream, behaviour)
                cardinality = Cardinality.UNARY_STREAM
            else:
                async def handle(stream, behaviour=behaviour):
                    await self._serve_unary(stream, behaviour)
                cardinality = Cardinality.UNARY_UNARY
            mapping[f"/{SERVICE.full_name}/{method.name}"] = Handler(handle, cardinality, request_type, response_type)
        return mapping

    async def _serve_unary(self, stream, behaviour) -> None:
        request = await stream.recv_message()
        context = CallContext(stream, asyncio.get_running_loop(), asyncio.current_task())
        try:
            running = self.pool.submit(behaviour, request, context)
            try:
                response = await asyncio.wrap_future(running)
            except Aborted as aborted:
                await _end(stream, context, aborted)
                return
            except asyncio.CancelledError:
                context.active = False  # the call goes on in its thread; it sees the client is gone
                raise
            await stream.send_message(response)
        finally:
            context.finished()

    async def _serve_stream(self, stream, behaviour) -> None:
        request = await stream.recv_message()
        context = CallContext(stream, asyncio.get_running_loop(), asyncio.current_task())
        chunks = behaviour(request, context)  # a generator: nothing of the call runs until the first step
        step: concurrent.futures.Future | None = None
        try:
            while True:
                step = self.pool.submit(next, chunks, _END)
                try:
                    chunk = await asyncio.wrap_future(step)
                except Aborted as aborted:
                    await _end(stream, context, aborted)
                    return
                step = None
                if chunk is _END:
                    return
                await stream.send_message(chunk)
        except asyncio.CancelledError:
            context.active = False
            raise
        finally:
            context.finished()
            if step is None:
                self.pool.submit(chunks.close)
            else:  # a step still runs in its thread: close the stream after it (its finally blocks run)
                step.add_done_callback(lambda _: self.pool.submit(chunks.close))


async def _end(stream, context: CallContext, aborted: Aborted) -> None:
    await stream.send_trailing_metadata(status=Status(aborted.code.number), status_message=aborted.message,
                                        metadata=context.trailing or None)


class GrpclibTransport:
    name = "grpclib"

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.status: ServiceStatus | None = None
        self._thread: threading.Thread | None = None

    def start(self, worker: Worker, endpoint: Endpoint, token: BearerToken | None) -> Endpoint | None:
        settings = worker.settings
        sock = _listen(endpoint, worker.reuse_port)
        if sock is None:
            return None
        # Thread names as on grpcio: ThreadPoolExecutor-0_0, ... (the guide's log lines show them).
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.handler_threads,
                                                          thread_name_prefix="ThreadPoolExecutor-0")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="snakepit-grpclib", daemon=True)
        self._thread.start()
        codec = LimitedProtoCodec(int(settings.args.max_message_mb * 1024 * 1024))
        bridge = BridgeService(worker.servicer, self.pool)
        tls = settings.tls

        async def serve() -> None:
            self.status = ServiceStatus()
            self.status.set(True)
            health = Health({bridge: [self.status], OVERALL: [self.status]})
            # The names grpcio's reflection lists, so that `grpcurl list` cannot tell the transports apart.
            names = [SERVICE.full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
            services: list[Any] = [bridge, health, ServerReflection(_service_names=names),
                                   _ServerReflectionV1Alpha(_service_names=names)]
            self.server = Server(services, codec=codec)
            if token is not None:
                _require_token(self.server, token)
            await self.server.start(sock=sock, ssl=tls.server_ssl_context() if tls is not None else None)

        asyncio.run_coroutine_threadsafe(serve(), self.loop).result()
        if tls is not None:
            log.info("%s", tls.describe())
        return endpoint if endpoint.is_unix else endpoint.with_port(sock.getsockname()[1])

    def set_serving(self, serving: bool) -> None:
        assert self.loop is not None and self.status is not None
        self.loop.call_soon_threadsafe(self.status.set, serving)

    def not_serving(self) -> None:
        assert self.loop is not None and self.status is not None
        status = self.status

        async def announce() -> None:
            status.set(False)
            await asyncio.sleep(0.1)  # open Health/Watch streams send NOT_SERVING before anything closes

        asyncio.run_coroutine_threadsafe(announce(), self.loop).result(5.0)

    def stop(self, grace: float) -> threading.Event:
        """Nothing to do yet: the servicer, now stopping, refuses new tool calls while the running ones
        finish. grpclib's own close cancels every handler, so it waits for `stop_now`, which the worker
        calls once no tool call is left or `grace` has passed."""
        return threading.Event()

    def stop_now(self) -> None:
        if self.loop is None or self.server is None or self.loop.is_closed():
            return
        server = self.server

        async def close() -> None:
            server.close()
            # Since Python 3.12 asyncio's wait_closed also waits for every client connection to close,
            # and a client's channel stays open: close them (grpcio's stop ends them as well).
            listening = getattr(server, "_server", None)
            close_clients = getattr(listening, "close_clients", None)
            if callable(close_clients):
                close_clients()
            try:
                await asyncio.wait_for(server.wait_closed(), 5.0)
            except asyncio.TimeoutError:
                log.warning("grpclib handlers still running 5 s after close")

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10.0)
        except Exception:
            log.exception("closing the grpclib server failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.server = None


def _listen(endpoint: Endpoint, reuse_port: bool) -> socket.socket | None:
    if endpoint.path is not None:
        # Bound here rather than by grpclib's start(path=...): asyncio's create_unix_server would first
        # unlink whatever socket is at the path (the worker has claimed it already, see unix_socket.py).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = endpoint.path
        binding: Any = owner_only_umask()
    else:
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it every response waits for the client's delayed ACK (44 ms a call, measured).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        address, binding = (endpoint.host, endpoint.port), contextlib.nullcontext()
    try:
        with binding:
            sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        log.debug("cannot listen on %s: %s", endpoint, exc)
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def _require_token(server: Server, token: BearerToken) -> None:
    async def check(event: RecvRequest) -> None:
        refusal = token.refusal(event.method_name, event.metadata.get("authorization"))
        if refusal is not None:
            async def refuse(stream) -> None:  # never reads the request
                await stream.send_trailing_metadata(status=Status.UNAUTHENTICATED, status_message=refusal)

            event.method_func = refuse

    listen(server, RecvRequest, check)
