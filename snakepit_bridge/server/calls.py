"""Tool calls in flight, per client connection, and how long their responses have waited to be read.

Two limits keep one client from holding what the others need:

* `max_per_connection`: tool calls one HTTP/2 connection may have in flight (running, queued, or
  sending their response); past it a new call is RESOURCE_EXHAUSTED at once.
* `send_timeout`: a response (a unary reply, or a stream's next chunk) that the client has not taken
  within this many seconds ends the call (CANCELLED): a reader that never grants flow-control window
  holds its call for a bounded time only.

A call counts from the start of its handler until grpc reports the RPC terminated (the context's
done callback), so the sending of the last response is counted too.

A call is counted against its connection only while more than `max_per_connection` calls are in
flight in all: below that no connection can be past its cap. grpcio's `context.peer()` releases the
GIL, and under load a handler thread that lets it go waits behind every other one to take it back
(70-90 µs a call at 32 in flight), so it is asked only then, for the calls not yet counted too.
"""
from __future__ import annotations

import functools
import logging
import threading
import time

from ..contract.errors import ResourceExhausted

log = logging.getLogger("snakepit_bridge.server")


class TrackedCall:
    __slots__ = ("peer", "context", "method", "sending_since", "cancelled")

    def __init__(self, peer: str | None, context, method: str) -> None:
        self.peer = peer  # None until the call is counted against its connection
        self.context = context
        self.method = method
        self.sending_since: float | None = None  # time.monotonic() when its pending response was handed to grpc
        self.cancelled = False

    def sending(self) -> None:
        self.sending_since = time.monotonic()

    def sent(self) -> None:
        self.sending_since = None


class CallTracker:
    def __init__(self, max_per_connection: int, send_timeout: float | None) -> None:
        self.max_per_connection = max_per_connection
        self.send_timeout = send_timeout or None
        self._lock = threading.Lock()
        self._per_peer: dict[str, int] = {}  # calls counted against each connection
        self._calls: set[TrackedCall] = set()
        self._uncounted: set[TrackedCall] = set()  # calls in _calls whose connection is not counted yet
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if self.send_timeout is not None:
            self._watchdog = threading.Thread(target=self._watch, name="snakepit-send-watchdog", daemon=True)
            self._watchdog.start()

    def begin(self, context, method: str) -> TrackedCall:
        """Count a new tool call on its connection; RESOURCE_EXHAUSTED past the per-connection limit."""
        call = TrackedCall(None, context, method)
        with self._lock:
            self._calls.add(call)
            if len(self._calls) <= self.max_per_connection:
                self._uncounted.add(call)
            else:
                count = self._count_connections(call)
                if count > self.max_per_connection:
                    self._forget(call)
                    raise ResourceExhausted(
                        f"this connection has {count - 1} tool calls in flight (max-calls-per-connection "
                        f"{self.max_per_connection}); wait for one to finish or open another connection")
        if not context.add_callback(functools.partial(self._end, call)):
            self._end(call)  # the RPC already terminated: no callback will come
        return call

    def _count_connections(self, new_call: TrackedCall) -> int:
        """Count `new_call` and every call not yet counted against its connection (the lock is held);
        returns the calls now counted on `new_call`'s connection."""
        per_peer = self._per_peer
        for call in (*self._uncounted, new_call):
            call.peer = peer = call.context.peer()
            per_peer[peer] = per_peer.get(peer, 0) + 1
        self._uncounted.clear()
        return per_peer[peer]

    def _end(self, call: TrackedCall) -> None:
        with self._lock:
            if call in self._calls:
                self._forget(call)

    def _forget(self, call: TrackedCall) -> None:
        self._calls.discard(call)
        self._uncounted.discard(call)
        if call.peer is None:
            return
        left = self._per_peer[call.peer] - 1
        if left:
            self._per_peer[call.peer] = left
        else:
            del self._per_peer[call.peer]

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        timeout = self.send_timeout
        assert timeout is not None
        while not self._stop.wait(min(1.0, timeout / 4)):
            now = time.monotonic()
            with self._lock:
                stalled = [c for c in self._calls
                           if not c.cancelled and c.sending_since is not None and now - c.sending_since > timeout]
            for call in stalled:
                call.cancelled = True
                log.warning("cancelling %s from %s: its client has not read the response for %.1f s (--send-timeout)",
                            call.method, call.peer or call.context.peer(), now - (call.sending_since or now))
                call.context.cancel()
