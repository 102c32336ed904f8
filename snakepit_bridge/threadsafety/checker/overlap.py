"""Real overlap: per tracked method, who is inside it now and the most threads that were inside it
at the same time (an observation, not a finding: overlap alone is no race)."""
from __future__ import annotations

import logging
import threading
from typing import Any


class Overlap:
    """Per (class, method): who is inside now, and the most threads inside at the same time."""

    __slots__ = ("inside", "peak", "peak_threads", "calls", "names")

    def __init__(self) -> None:
        self.inside: set[int] = set()
        self.peak = 0
        self.peak_threads: list[str] = []
        self.calls: dict[int, int] = {}    # thread token -> calls (each thread writes its own)
        self.names: dict[int, str] = {}    # thread token -> thread name


# what MethodOverlap.enter returns and exit takes back: (record, thread token, outermost entry)
EntryToken = tuple[Overlap, int, bool]


class MethodOverlap:
    """The overlap records of every tracked method. ``lock`` is the checker's."""

    def __init__(self, lock: threading.RLock, log: logging.Logger) -> None:
        self._lock = lock
        self._log = log
        self.records: dict[tuple[str, str], Overlap] = {}   # (class, method) -> overlap record

    def enter(self, cls_name: str, name: str, tok: int) -> EntryToken:
        key = (cls_name, name)
        rec = self.records.get(key)
        if rec is None:
            with self._lock:
                rec = self.records.setdefault(key, Overlap())
        # No lock on the common path: only this thread writes its own entries; set add/discard
        # and dict item assignment are atomic.
        rec.calls[tok] = rec.calls.get(tok, 0) + 1
        if tok not in rec.names:
            rec.names[tok] = threading.current_thread().name
        inside = rec.inside
        first = tok not in inside
        if first:
            inside.add(tok)
            if len(inside) > rec.peak:
                self._new_peak(rec, name)
        return (rec, tok, first)

    def exit(self, token: EntryToken) -> None:
        rec, tok, first = token
        if first:
            rec.inside.discard(tok)

    def _new_peak(self, rec: Overlap, name: str) -> None:
        with self._lock:
            inside = list(rec.inside)
            if len(inside) <= rec.peak:
                return
            newly_concurrent = rec.peak < 2 <= len(inside)
            rec.peak = len(inside)
            rec.peak_threads = sorted(rec.names.get(t, "?") for t in inside)
        if newly_concurrent:
            # the guide's wording; an observation, not a finding (overlap alone is no race)
            self._log.info("⚠️  THREAD SAFETY: Method '%s' accessed by %d different threads "
                           "concurrently.", name, 2)

    def peak(self, cls_name: str, name: str) -> int:
        rec = self.records.get((cls_name, name))
        return rec.peak if rec is not None else 0

    def summary(self) -> dict[str, dict[str, Any]]:
        """The report's "methods": per "Class.method", its calls, threads and peak overlap. Call
        it holding the checker's lock."""
        methods = {}
        for (cls_name, name), rec in sorted(self.records.items()):
            methods[f"{cls_name}.{name}"] = {
                "class": cls_name,
                "method": name,
                "calls": sum(list(rec.calls.values())),
                "threads_seen": len(rec.calls),
                "peak_concurrent_threads": rec.peak,
                "peak_threads": list(rec.peak_threads),
                "concurrent": rec.peak >= 2,
                "active_now": len(rec.inside),
            }
        return methods
