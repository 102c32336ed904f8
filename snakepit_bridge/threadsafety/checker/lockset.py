"""Lockset state: what each thread holds, and the lockset judgement of shared things (Eraser,
Savage et al., 1997).

Per thread (:data:`per_thread`): a token that is never reused, the adapter locks it holds (its
lockset) and the tracked methods it is inside. Per shared thing (an attribute's binding or its
container's contents, a library object or module): its distinct accesses, and the first two, from
different threads, at least one a write, whose locksets share no lock -- a :class:`Conflict`.
"""
from __future__ import annotations

import threading
from types import FrameType
from typing import TYPE_CHECKING, NamedTuple, Optional

if TYPE_CHECKING:
    from .instrument import InstanceState

_EMPTY: frozenset = frozenset()

# This thread's "token" (int), "held" ({lock id: depth}), "lockset" (frozenset of lock ids) and
# "tools" (names of the tracked methods it is inside, innermost last). The instrumented hot paths
# read its __dict__ directly.
per_thread = threading.local()

_token_lock = threading.Lock()
_token_next = [0]


def thread_token() -> int:
    """A number for the calling thread that is never reused (thread idents are, once a thread
    ends, and then two short-lived threads would look like one)."""
    d = per_thread.__dict__
    t = d.get("token")
    if t is None:
        with _token_lock:
            _token_next[0] += 1
            t = d["token"] = _token_next[0]
    return t


def held_locks() -> frozenset:
    """The ids of the adapter locks this thread holds."""
    try:
        return per_thread.lockset
    except AttributeError:
        return _EMPTY


def lock_acquired(lock_id: int) -> None:
    d = per_thread.__dict__
    held = d.get("held")
    if held is None:
        held = d["held"] = {}
    n = held.get(lock_id, 0)
    held[lock_id] = n + 1
    if n == 0:
        d["lockset"] = frozenset(held)


def lock_released(lock_id: int) -> None:
    d = per_thread.__dict__
    held = d.get("held")
    if not held or lock_id not in held:
        return
    n = held[lock_id] - 1
    if n:
        held[lock_id] = n
    else:
        del held[lock_id]
        d["lockset"] = frozenset(held)


def current_tool() -> Optional[str]:
    """The innermost tracked method this thread is inside, or None."""
    tools = per_thread.__dict__.get("tools")
    return tools[-1] if tools else None


def enter_tool(name: str) -> None:
    tl = per_thread.__dict__
    tools = tl.get("tools")
    if tools is None:
        tools = tl["tools"] = []
    tools.append(name)


def exit_tool() -> None:
    tools = per_thread.__dict__.get("tools")
    if tools:
        tools.pop()


class Access:
    """One distinct access: who (thread), what (read/write, binding/contents/library), where (the
    frame's code and line, the tool it ran in) and holding which locks."""

    __slots__ = ("tid", "thread", "write", "locks", "function", "method", "tool", "file", "line",
                 "part")

    def __init__(self, tid: int, write: bool, locks: frozenset, frame: FrameType, part: str) -> None:
        self.tid = tid
        self.thread = threading.current_thread().name
        self.write = write
        self.locks = locks
        code = frame.f_code
        self.function = getattr(code, "co_qualname", code.co_name)
        self.method = code.co_name
        self.tool = current_tool()
        self.file = code.co_filename
        self.line = frame.f_lineno
        self.part = part


class SharedThing:
    __slots__ = ("summaries", "accesses", "reported")

    def __init__(self) -> None:
        self.summaries: dict[tuple, Access] = {}   # (tid, [write,] lockset) -> first such access
        self.accesses: list[Access] = []            # distinct (site, kind, thread), bounded
        self.reported = False                       # (library uses; attributes are per object+name)


class Conflict(NamedTuple):
    """Two accesses with no lock in common, and every access of the thing seen so far."""

    first: Access
    second: Access
    related: list[Access]


MAX_ACCESSES_PER_THING = 32
MAX_SEEN = 200_000


class LocksetState:
    """The accesses of every shared thing, each judged once per (thread, kind, lockset, site).

    ``lock`` is the checker's lock (one lock for the whole checker: no ordering to get wrong). The
    common path -- an access already judged -- takes no lock: a dict lookup, which takes none on
    free-threaded builds either."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._seen: dict = {}
        self.attributes: dict[tuple, SharedThing] = {}   # (object id, attribute, part) -> accesses
        self._reported: set = set()                      # (object id, attribute) already reported
        self.library_uses: dict[tuple, SharedThing] = {}

    def record_attribute(self, st: InstanceState, attr: str, part: str, write: bool,
                         frame: FrameType) -> Optional[Conflict]:
        """An access of ``attr`` (``part``: "binding" or "contents") of a tracked instance. Returns
        the conflict the first time the attribute has one (either part), else None."""
        tid = thread_token()
        locks = held_locks()
        key = (st.obj_id, attr, part, tid, write, locks, frame.f_code, frame.f_lineno)
        seen = self._seen
        if key in seen:
            return None
        with self._lock:
            if key in seen or st.detached:
                return None
            if len(seen) < MAX_SEEN:
                seen[key] = None
            acc = Access(tid, write, locks, frame, part)
            vkey = (st.obj_id, attr, part)
            var = self.attributes.get(vkey)
            if var is None:
                var = self.attributes[vkey] = SharedThing()
            if len(var.accesses) < MAX_ACCESSES_PER_THING:
                var.accesses.append(acc)
            skey = (tid, write, locks)
            if skey in var.summaries:
                return None
            conflict = None
            if (st.obj_id, attr) not in self._reported:
                for other in var.summaries.values():
                    if other.tid != tid and (write or other.write) and not (locks & other.locks):
                        self._reported.add((st.obj_id, attr))
                        related = [a for p in ("binding", "contents")
                                   for a in (self.attributes.get((st.obj_id, attr, p)) or SharedThing()).accesses]
                        conflict = Conflict(other, acc, related)
                        break
            var.summaries[skey] = acc
            return conflict

    def record_library_use(self, key: tuple, frame: FrameType) -> Optional[Conflict]:
        """A use of an unsafe library's object or module state (``key`` names which); every use
        counts as a write. Returns the conflict the first time the thing has one, else None."""
        tid = thread_token()
        locks = held_locks()
        fast = (key, tid, locks, frame.f_code, frame.f_lineno)
        if fast in self._seen:
            return None
        with self._lock:
            if fast in self._seen:
                return None
            if len(self._seen) < MAX_SEEN:
                self._seen[fast] = None
            rec = self.library_uses.get(key)
            if rec is None:
                rec = self.library_uses[key] = SharedThing()
            acc = Access(tid, True, locks, frame, "library")
            if len(rec.accesses) < MAX_ACCESSES_PER_THING:
                rec.accesses.append(acc)
            skey = (tid, locks)
            if skey in rec.summaries:
                return None
            conflict = None
            if not rec.reported:
                for other in rec.summaries.values():
                    if other.tid != tid and not (locks & other.locks):
                        rec.reported = True
                        conflict = Conflict(other, acc, list(rec.accesses))
                        break
            rec.summaries[skey] = acc
            return conflict
