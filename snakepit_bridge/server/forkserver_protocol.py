"""The lines of the fork server's protocol (`forkserver.py` documents it for the pool): request lines
parsed into requests, events formatted as lines, and a child's output cut into lines of bounded length.

Everything here is bytes in, bytes out, and knows nothing of processes.
"""
from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field

from .logs import printable

READY_EVENT = "SNAKEPIT_FORKSERVER_READY"
REQUEST_LINE_LIMIT = 1 << 20   # bytes of one request line (its JSON carries flags and environment variables)
OUTPUT_LINE_LIMIT = 16 * 1024  # bytes of one relayed line of a child's stdout or stderr; the rest is cut
MESSAGE_CHARS = 1000           # characters of an error event's message
NONCE_CHARS = 256
# An id is one word of the event lines. "-" stands for "no id" in error events and "error" starts them,
# so neither can be a child's id: the first word of an event line then always tells what it is.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,128}")
RESERVED_IDS = frozenset({"-", "error"})
NO_ID = "-"
SIGNALS = {member.name: member for member in signal.Signals}
SPAWN_KEYS = frozenset({"args", "env", "nonce"})


@dataclass(frozen=True)
class Spawn:
    """`spawn <id> <json>`: fork a worker with these flags after the fork server's own."""

    id: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    nonce: str | None = None


@dataclass(frozen=True)
class Signal:
    """`signal <id> <SIGNAME>`: send a signal to a running child."""

    id: str
    signum: int


class BadRequest(Exception):
    """A request line that cannot be served: answered by one `error <id or -> <message>` event."""

    def __init__(self, id: str, message: str) -> None:
        super().__init__(message)
        self.id = id
        self.message = message


def parse_request(line: bytes) -> Spawn | Signal:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(NO_ID, "a request line must be UTF-8") from None
    verb, _, rest = text.strip().partition(" ")
    if verb == "spawn":
        id, _, payload = rest.partition(" ")
        return parse_spawn(checked_id(id, "spawn <id> <json>"), payload)
    if verb == "signal":
        id, _, name = rest.partition(" ")
        id = checked_id(id, "signal <id> <SIGNAME>")
        if name not in SIGNALS:
            raise BadRequest(id, f"signal {id}: {name!r} is not a signal name (SIGTERM, SIGKILL, SIGINT, ...)")
        return Signal(id, int(SIGNALS[name]))
    raise BadRequest(NO_ID, f"unknown request {verb!r}: a request is `spawn <id> <json>` or `signal <id> <SIGNAME>`")


def checked_id(id: str, usage: str) -> str:
    if not id:
        raise BadRequest(NO_ID, f"{usage}: the id is missing")
    if not ID_PATTERN.fullmatch(id) or id in RESERVED_IDS:
        raise BadRequest(NO_ID, f"{usage}: bad id {id!r}: 1-128 of A-Z a-z 0-9 _ . : @ / + = -, not '-' or 'error'")
    return id


def parse_spawn(id: str, payload: str) -> Spawn:
    if not payload.strip():
        return Spawn(id)
    try:
        spec = json.loads(payload)
    except ValueError as exc:
        raise BadRequest(id, f"spawn {id}: the request is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise BadRequest(id, f"spawn {id}: the request must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - SPAWN_KEYS)
    if unknown:
        raise BadRequest(id, f"spawn {id}: unknown keys {unknown}: the keys are {sorted(SPAWN_KEYS)}")
    args = spec.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, str) and "\0" not in arg for arg in args):
        raise BadRequest(id, f"spawn {id}: \"args\" must be a list of strings (the child's flags)")
    env = spec.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(value, str) and key and "=" not in key and "\0" not in key + value
            for key, value in env.items()):
        raise BadRequest(id, f"spawn {id}: \"env\" must map variable names (no '=') to strings")
    nonce = spec.get("nonce")
    if nonce is not None and not (isinstance(nonce, str) and re.fullmatch(rf"\S{{1,{NONCE_CHARS}}}", nonce)):
        raise BadRequest(id, f"spawn {id}: \"nonce\" must be a word of 1-{NONCE_CHARS} characters without spaces")
    return Spawn(id, tuple(args), dict(env), nonce)


def event(id: str, kind: str, detail: bytes | str = b"") -> bytes:
    """One event line without its newline: `<id> <kind> <detail>`."""
    if isinstance(detail, str):
        detail = detail.encode("utf-8", "backslashreplace")
    return b"%s %s %s" % (id.encode("ascii"), kind.encode("ascii"), detail)


def error_event(id: str, message: str) -> bytes:
    return b"error %s %s" % (id.encode("ascii"), printable(message, MESSAGE_CHARS).encode("utf-8", "backslashreplace"))


def ready_line(pid: int, nonce: str | None) -> bytes:
    """The fork server's readiness, as a worker's: with a nonce, on a line of its own."""
    if nonce:
        return f"\n{READY_EVENT} pid={pid} nonce={nonce}".encode()
    return f"{READY_EVENT} pid={pid}".encode()


class LineSplitter:
    """Cuts a byte stream into lines (without their newline). A line longer than `limit` bytes keeps its
    first `limit` bytes and ends in `...(N more bytes)`, so one line of output stays one bounded event
    line, and memory stays bounded whatever a child prints."""

    def __init__(self, limit: int = OUTPUT_LINE_LIMIT) -> None:
        self.limit = limit
        self.partial = bytearray()
        self.cut = 0  # bytes of the current line dropped past the limit

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:])
                return lines
            self._keep(data[start:end])
            lines.append(self._take())
            start = end + 1

    def finish(self) -> list[bytes]:
        """The last line, when the stream ended without a newline."""
        return [self._take()] if self.partial or self.cut else []

    def _keep(self, piece: bytes) -> None:
        room = self.limit - len(self.partial)
        self.partial += piece[:room]
        self.cut += max(0, len(piece) - room)

    def _take(self) -> bytes:
        line = bytes(self.partial)
        if self.cut:
            line += b"...(%d more bytes)" % self.cut
        self.partial.clear()
        self.cut = 0
        return line


class RequestReader:
    """Cuts stdin into request lines of at most REQUEST_LINE_LIMIT bytes; a longer one is dropped whole
    and reported once (as BadRequest in the returned list)."""

    def __init__(self, limit: int = REQUEST_LINE_LIMIT) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.dropping = False

    def feed(self, data: bytes) -> list[bytes | BadRequest]:
        self.buffer += data
        lines: list[bytes | BadRequest] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if self.dropping:
                self.dropping = False
            elif len(line) > self.limit:
                lines.append(BadRequest(NO_ID, f"a request line longer than {self.limit} bytes: dropped"))
            elif line.strip():
                lines.append(line)
        if len(self.buffer) > self.limit:
            if not self.dropping:
                lines.append(BadRequest(NO_ID, f"a request line longer than {self.limit} bytes: dropped"))
            self.dropping = True
            self.buffer.clear()
        return lines

    def finish(self) -> list[bytes | BadRequest]:
        """A last request that stdin's end cut off before its newline."""
        line, self.buffer = bytes(self.buffer), bytearray()
        return [line] if line.strip() and not self.dropping else []
