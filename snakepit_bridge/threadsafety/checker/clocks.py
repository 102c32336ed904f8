"""Happens-before: a vector clock per thread (as in FastTrack, Flanagan & Freund 2009, and
ThreadSanitizer v2).

Each thread's clock maps thread tokens to counts; its own entry is its current *epoch*. A release
(unlocking a lock, ``Queue.put``, ``Event.set``, ``Thread.start``, ...) joins the thread's clock
into the synchronisation object's clock and starts a new epoch; an acquire (the matching lock,
``get``, ``wait``, ``join``, ...) joins the object's clock into the thread's. An access made in
epoch ``e`` of thread ``t`` happens before thread ``u``'s present when ``e <= clock_u[t]``.

Only the owning thread changes its own clock, so the hot path (reading the epoch) takes no lock.
Synchronisation objects' clocks are joined under :data:`_sync_lock`.
"""
from __future__ import annotations

import threading

from .lockset import epoch, my_clock, per_thread

__all__ = ["epoch", "my_clock", "release_into", "acquire_from", "snapshot_release",
           "lock_acquire", "lock_release", "ordered_before"]

VectorClock = dict   # thread token -> count

_sync_lock = threading.Lock()


def ordered_before(other_tid: int, other_epoch: int) -> bool:
    """Does epoch ``other_epoch`` of thread ``other_tid`` happen before the calling thread's now?"""
    return other_epoch <= my_clock().get(other_tid, 0)


def _tick() -> None:
    d = per_thread.__dict__
    vc = my_clock()
    tok = d["token"]
    e = vc[tok] + 1
    vc[tok] = e
    d["epoch"] = e


def release_into(target: VectorClock) -> None:
    """Release: join the calling thread's clock into ``target`` (a sync object's), new epoch."""
    vc = my_clock()
    with _sync_lock:
        for t, c in vc.items():
            if target.get(t, 0) < c:
                target[t] = c
    _tick()


def snapshot_release() -> VectorClock:
    """Release into a fresh clock (a hand-off to one receiver: a thread start, a submitted call)."""
    snap = dict(my_clock())
    _tick()
    return snap


def acquire_from(source: VectorClock) -> None:
    """Acquire: join ``source`` (a sync object's clock) into the calling thread's clock."""
    vc = my_clock()
    with _sync_lock:
        items = list(source.items())
    for t, c in items:
        if vc.get(t, 0) < c:
            vc[t] = c


# Locks (C objects without a __dict__) keep their clocks here, by id, while a checker is enabled.
# A lock's holders are totally ordered, so a release can *replace* the lock's clock with a copy of
# the holder's (which already includes the previous holder's, acquired with the lock) -- no join,
# no lock: the copy is never changed after it is stored.
_lock_clocks: dict[int, VectorClock] = {}


def lock_release(lock_id: int) -> None:
    d = per_thread.__dict__
    vc = d.get("vc") or my_clock()
    _lock_clocks[lock_id] = dict(vc)
    tok = d["token"]
    e = vc[tok] + 1
    vc[tok] = e
    d["epoch"] = e


def lock_acquire(lock_id: int) -> None:
    c = _lock_clocks.get(lock_id)
    if c:
        vc = per_thread.__dict__.get("vc") or my_clock()
        for t, n in c.items():
            if vc.get(t, 0) < n:
                vc[t] = n


def forget_locks() -> None:
    """Drop the lock clocks (the last checker closed: ids may be reused by new locks)."""
    _lock_clocks.clear()
