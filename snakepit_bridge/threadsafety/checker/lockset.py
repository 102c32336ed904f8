"""Per-thread state and the judgement of shared things: lockset (Eraser, Savage et al., 1997)
combined with happens-before (vector clocks, see clocks.py).

Per thread (:data:`per_thread`): a token that is never reused, the adapter locks it holds (its
lockset), its vector clock and epoch, and the tracked methods it is inside. Per shared thing (an
attribute's binding, its container's structure, values or one element, a library object or
module): its distinct accesses, the latest per (thread, kind, lockset), and the first two, from
different threads, at least one a write, not both commuting, that no happens-before edge orders
and whose locksets share no lock -- a :class:`Conflict`.
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


def my_clock() -> dict:
    """The calling thread's vector clock, thread token -> count (created on first use, at epoch
    1; see clocks.py)."""
    d = per_thread.__dict__
    vc = d.get("vc")
    if vc is None:
        vc = d["vc"] = {thread_token(): 1}
        d["epoch"] = 1
    return vc


def epoch() -> int:
    """The calling thread's own entry in its vector clock."""
    e = per_thread.__dict__.get("epoch")
    if e is None:
        my_clock()
        e = per_thread.__dict__["epoch"]
    return e


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
    """One recorded access: who (thread, its epoch), what (read/write, which part), where (the
    frame's code and line, a few callers, the tool it ran in) and holding which locks.

    ``commutes``: an access that does not conflict with another commuting one (inserting distinct
    keys into a dict, touching one element while another thread touches another) but does with
    whole-container accesses (iterating, ``len``, ``clear``)."""

    __slots__ = ("tid", "epoch", "thread", "write", "commutes", "locks", "function", "method",
                 "tool", "file", "line", "part", "stack", "var")

    def __init__(self, tid: int, write: bool, locks: frozenset, frame: FrameType, part: tuple,
                 epoch: int = 0, commutes: bool = False) -> None:
        self.tid = tid
        self.epoch = epoch
        self.thread = threading.current_thread().name
        self.write = write
        self.commutes = commutes
        self.locks = locks
        code = frame.f_code
        self.function = getattr(code, "co_qualname", code.co_name)
        self.method = code.co_name
        self.tool = current_tool()
        self.file = code.co_filename
        self.line = frame.f_lineno
        self.part = part
        stack: list[tuple] = []
        f: Optional[FrameType] = frame
        while f is not None and len(stack) < STACK_DEPTH:
            stack.append((f.f_code, f.f_lineno))
            f = f.f_back
        self.stack = stack
        self.var: Optional[SharedThing] = None      # what it is an access of


STACK_DEPTH = 6


class SharedThing:
    __slots__ = ("summaries", "accesses", "reported", "write_records")

    def __init__(self) -> None:
        self.summaries: dict[tuple, Access] = {}   # (tid, write, commutes, lockset) -> latest
        self.accesses: list[Access] = []            # distinct (site, kind, thread), bounded
        self.reported = False                       # (library uses; attributes are per object+name)
        self.write_records = 0                      # writes recorded (a new epoch or site each)


class Conflict(NamedTuple):
    """Two accesses, unordered by happens-before, with no lock in common; and every access of
    the thing seen so far."""

    first: Access
    second: Access
    related: list[Access]


MAX_ACCESSES_PER_THING = 32
MAX_SEEN = 200_000
BINDING = ("binding",)


def conflicts(a: Access, b: Access) -> bool:
    """Could ``a`` and ``b`` (different threads) race, leaving order aside: at least one writes,
    they do not both commute, and they share no lock."""
    return (a.write or b.write) and not (a.commutes and b.commutes) and not (a.locks & b.locks)


def is_publication(var: SharedThing, a: Access, b: Access) -> bool:
    """The one-time publication rule (docs/thread-safety-checker.md): a binding written exactly
    once while serving, under a lock, and read without it, is a safe publication in CPython, with
    and without the GIL (the reference is stored atomically, after the object was built)."""
    if var.write_records != 1 or a.part != BINDING:
        return False
    w, r = (a, b) if a.write else (b, a)
    return w.write and not r.write and bool(w.locks)


class LocksetState:
    """The accesses of every shared thing: a race is two accesses from different threads, at least
    one a write, that no happens-before edge orders and that hold no lock in common.

    ``lock`` is the checker's lock (one lock for the whole checker: no ordering to get wrong). The
    common path -- the same access again in the same epoch of the same thread -- takes no lock: a
    dict lookup, which takes none on free-threaded builds either."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._seen: dict = {}
        self.attributes: dict[tuple, SharedThing] = {}   # (object id, attribute, part) -> accesses
        self._reported: set = set()                      # (object id, attribute) already reported
        self.library_uses: dict[tuple, SharedThing] = {}

    def record_attribute(self, st: InstanceState, attr: str, part: tuple, write: bool,
                         frame: FrameType, commutes: bool = False) -> Optional[Conflict]:
        """An access of ``attr``'s ``part`` (:data:`BINDING`, ``("contents", path)`` or
        ``("item", path, key)``) of a tracked instance. Returns the conflict the first time the
        attribute has one (any part), else None."""
        d = per_thread.__dict__
        ep = d.get("epoch")
        if ep is None:
            ep = epoch()
        tid = d.get("token") or thread_token()
        locks = d.get("lockset", _EMPTY)
        key = (st.obj_id, attr, part, tid, write, locks, frame.f_code, frame.f_lineno)
        seen = self._seen
        acc = seen.get(key)
        if acc is not None and acc.epoch == ep:
            return None
        with self._lock:
            if st.detached:
                return None
            if acc is not None:
                # the same access in a new epoch (after a release): only this thread changes its
                # own records, so the record is reused with its new epoch
                acc.epoch = ep
                var = acc.var
            else:
                acc = Access(tid, write, locks, frame, part, ep, commutes)
                vkey = (st.obj_id, attr, part)
                var = self.attributes.get(vkey)
                if var is None:
                    var = self.attributes[vkey] = SharedThing()
                acc.var = var
                if len(seen) < MAX_SEEN:      # past the bound: judged every time, not remembered
                    seen[key] = acc
                if len(var.accesses) < MAX_ACCESSES_PER_THING:
                    var.accesses.append(acc)
            if write:
                var.write_records += 1
            conflict = None
            if (st.obj_id, attr) not in self._reported:
                clock = d["vc"]
                for other in var.summaries.values():
                    if other.tid != tid and conflicts(acc, other) and \
                            other.epoch > clock.get(other.tid, 0) and \
                            not is_publication(var, acc, other):
                        self._reported.add((st.obj_id, attr))
                        related = [a for (o, n, _p), v in self.attributes.items()
                                   if o == st.obj_id and n == attr for a in v.accesses]
                        conflict = Conflict(other, acc, related)
                        break
            var.summaries[(tid, write, commutes, locks)] = acc
            return conflict

    def record_library_use(self, key: tuple, frame: FrameType) -> Optional[Conflict]:
        """A use of an unsafe library's object or module state (``key`` names which); every use
        counts as a write. Returns the conflict the first time the thing has one, else None."""
        tid = thread_token()
        locks = held_locks()
        ep = epoch()
        fast = (key, tid, locks, frame.f_code, frame.f_lineno)
        if self._seen.get(fast) == ep:
            return None
        with self._lock:
            if len(self._seen) < MAX_SEEN:
                self._seen[fast] = ep
            rec = self.library_uses.get(key)
            if rec is None:
                rec = self.library_uses[key] = SharedThing()
            acc = Access(tid, True, locks, frame, ("library",), ep)
            if len(rec.accesses) < MAX_ACCESSES_PER_THING:
                rec.accesses.append(acc)
            conflict = None
            if not rec.reported:
                clock = my_clock()
                for other in rec.summaries.values():
                    if other.tid != tid and not (locks & other.locks) and \
                            other.epoch > clock.get(other.tid, 0):
                        rec.reported = True
                        conflict = Conflict(other, acc, list(rec.accesses))
                        break
            rec.summaries[(tid, locks)] = acc
            return conflict
