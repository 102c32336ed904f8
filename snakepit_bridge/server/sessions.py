"""Sessions: per-session state that tools read and write through `ctx.session`.

A session lives until `CleanupSession` or until it has been idle for its TTL. With a session
directory (`--session-dir`), each session is checkpointed to `<dir>/<session_id>.json` with
`SafeCheckpoint` on every change, so a new worker process (after recycling or a restart) that is asked
for the session loads its state from disk.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
import threading
import time
import uuid
from typing import Any, Callable

from ..contract.errors import InvalidArgument, NotFound, ResourceExhausted
from . import codec
from .failures import short_name

# The documented charset: also a safe file name under --session-dir. fullmatch, because `$` would
# also match before a trailing newline.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _now_ms() -> int:
    return int(time.time() * 1000)


class Session:
    """One session's state. Every method is thread-safe; values must be encodable by the codec."""

    def __init__(self, session_id: str, *, state: dict | None = None, ttl_seconds: float, seed: int | None,
                 metadata: dict[str, str] | None = None, created_at_ms: int | None = None,
                 on_change: Callable[["Session"], None] | None = None) -> None:
        self.id = session_id
        self.ttl_seconds = ttl_seconds
        self.seed = seed
        self.metadata = dict(metadata or {})
        self.created_at_ms = created_at_ms or _now_ms()
        self.last_used_ms = _now_ms()
        self._last_used_monotonic = time.monotonic()
        self._request_counter = itertools.count()
        self.request_count = 0
        self._state: dict[str, Any] = dict(state or {})
        self._lock = threading.RLock()
        self._on_change = on_change

    # -- state ------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return copy.deepcopy(self._state.get(key, default))

    def set(self, key: str, value: Any) -> None:
        codec.encode(value)  # refuse what could not be returned by GetSession
        with self._lock:
            self._state[key] = copy.deepcopy(value)
            self._changed()

    def delete(self, key: str) -> bool:
        with self._lock:
            existed = self._state.pop(key, _MISSING) is not _MISSING
            if existed:
                self._changed()
            return existed

    def update(self, fn: Callable[[dict], Any]) -> Any:
        """Read-modify-write under the session's lock: `fn(state)` mutates the dict in place (or
        returns a new dict). Returns the resulting state's copy."""
        with self._lock:
            working = copy.deepcopy(self._state)
            result = fn(working)
            new_state = result if isinstance(result, dict) else working
            codec.encode(new_state)
            self._state = new_state
            self._changed()
            return copy.deepcopy(new_state)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._state

    # -- bookkeeping --------------------------------------------------------------------------------
    def touch(self) -> None:
        self.last_used_ms = _now_ms()
        self._last_used_monotonic = time.monotonic()

    def next_request_number(self) -> int:
        number = next(self._request_counter)  # itertools.count is atomic under the GIL and its own lock
        self.request_count = number + 1
        return number

    def expired(self, now_monotonic: float) -> bool:
        return self.ttl_seconds > 0 and now_monotonic - self._last_used_monotonic > self.ttl_seconds

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    def to_record(self) -> dict[str, Any]:
        with self._lock:
            state_json, blobs = codec.encode(self._state)
        return {
            "session_id": self.id,
            "state_json": state_json,
            "blobs_hex": [b.hex() for b in blobs],
            "ttl_seconds": self.ttl_seconds,
            "seed": self.seed,
            "metadata": self.metadata,
            "created_at_ms": self.created_at_ms,
        }


_MISSING = object()


class SessionStore:
    """All sessions of a worker process, optionally checkpointed to a directory."""

    def __init__(self, *, default_ttl_seconds: float = 3600.0, session_dir: str | None = None,
                 sweep_interval_seconds: float = 5.0, max_sessions: int = 10000,
                 max_ttl_seconds: float = 86400.0) -> None:
        self.default_ttl_seconds = default_ttl_seconds
        self.session_dir = session_dir
        self.max_sessions = max_sessions
        self.max_ttl_seconds = max_ttl_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if session_dir:
            os.makedirs(session_dir, exist_ok=True)
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_interval_seconds,),
                                         name="snakepit-session-sweeper", daemon=True)
        self._sweeper.start()

    @staticmethod
    def validate_id(session_id: str) -> str:
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise InvalidArgument(
                f"session_id {short_name(session_id)!r} is invalid: use 1-128 characters of letters, digits, "
                "'_', '.', ':' or '-'", field="session_id")
        return session_id

    def create(self, session_id: str = "", *, state: dict | None = None, ttl_seconds: float = 0,
               seed: int | None = None, metadata: dict[str, str] | None = None) -> tuple[Session, bool]:
        session_id = self.validate_id(session_id) if session_id else uuid.uuid4().hex
        if ttl_seconds > self.max_ttl_seconds:
            raise ResourceExhausted(f"ttl_seconds {ttl_seconds:g} is over this server's maximum of "
                                    f"{self.max_ttl_seconds:g} s (--max-session-ttl)", field="ttl_seconds")
        if len(self) >= self.max_sessions:
            self.sweep()  # expired sessions the sweeper has not reached yet do not count
        with self._lock:
            existing = self._sessions.get(session_id)
        if existing is None:
            existing = self._load(session_id)
        if existing is not None:
            existing.touch()
            return existing, False
        if state is not None and not isinstance(state, dict):
            raise InvalidArgument("state_json must be a JSON object", field="state_json")
        session = Session(session_id, state=state, ttl_seconds=ttl_seconds or self.default_ttl_seconds, seed=seed,
                          metadata=metadata, on_change=self._persist if self.session_dir else None)
        with self._lock:
            raced = self._sessions.get(session_id)
            if raced is None:
                if len(self._sessions) >= self.max_sessions:
                    raise ResourceExhausted(
                        f"{len(self._sessions)} sessions are alive, this server's maximum (--max-sessions "
                        f"{self.max_sessions}); clean up sessions that are no longer used", field="session_id")
                raced = self._sessions[session_id] = session
        if raced is not session:
            return raced, False
        self._persist(session)
        return session, True

    def get(self, session_id: str) -> Session:
        """The live session, loading it from the session directory if another process created it;
        NOT_FOUND otherwise."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            self.validate_id(session_id)
            session = self._load(session_id)
        if session is None or session.expired(time.monotonic()):
            if session is not None:
                self.remove(session_id)
            raise NotFound(f"session '{session_id}' not found (never created, cleaned up, or expired)",
                           field="session_id")
        session.touch()
        return session

    def find(self, session_id: str) -> Session | None:
        try:
            return self.get(session_id)
        except (NotFound, InvalidArgument):
            return None

    def remove(self, session_id: str) -> bool:
        with self._lock:
            existed = self._sessions.pop(session_id, None) is not None
        if self.session_dir:
            existed = self._checkpoint(session_id).delete(remove_lock=True) or existed
        return existed

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        self._stop.set()

    # -- expiry ------------------------------------------------------------------------------------
    def sweep(self) -> int:
        now = time.monotonic()
        with self._lock:
            expired = [sid for sid, s in self._sessions.items() if s.expired(now)]
        for sid in expired:
            self.remove(sid)
        return len(expired)

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sweep()

    # -- persistence -------------------------------------------------------------------------------
    def _checkpoint(self, session_id: str):
        from ..toolkit.checkpoint import SafeCheckpoint

        assert self.session_dir is not None  # only called with a session directory
        return SafeCheckpoint(os.path.join(self.session_dir, f"{session_id}.json"))

    def _persist(self, session: Session) -> None:
        if self.session_dir:
            record = session.to_record()
            self._checkpoint(session.id).update(lambda _old: record)

    def _load(self, session_id: str) -> Session | None:
        if not self.session_dir:
            return None
        record = self._checkpoint(session_id).load_state()
        if not record:
            return None
        state = codec.decode(record["state_json"], [bytes.fromhex(h) for h in record.get("blobs_hex", [])])
        session = Session(session_id, state=state, ttl_seconds=record.get("ttl_seconds") or self.default_ttl_seconds,
                          seed=record.get("seed"), metadata=record.get("metadata"),
                          created_at_ms=record.get("created_at_ms"), on_change=self._persist)
        with self._lock:
            return self._sessions.setdefault(session_id, session)
