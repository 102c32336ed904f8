"""Racy adapters the first-generation checker missed (numpy arrays written in place, containers
inside containers) and ones the happens-before model must still catch (a hand-off that comes too
early, colliding keys, lazy initialisation checked outside the lock only).

Like ``safe_gen2``: ``CALLS``, ``FINAL``, and ``invariant(state, calls, results)``, which the test shows
*broken* (updates lost or duplicated) as well as the race reported (``EXPECT``).
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from snakepit_bridge.base_adapter_threaded import thread_safe_method, tool

from ._base import CorpusAdapter, pause


class NumpyHistogramInPlace(CorpusAdapter):
    """A numpy histogram held by the adapter, bins incremented in place with no lock."""

    CALLS = [("observe", {"value": 1}), ("observe", {"value": 2})]
    FINAL = ("state", {})
    EXPECT = ("unprotected_shared_state", "bins")

    def __init__(self):
        super().__init__()
        self.bins = np.zeros(4, dtype=np.int64)

    @thread_safe_method
    @tool
    def observe(self, value: int) -> int:
        count = self.bins[value]
        pause()
        self.bins[value] = count + 1
        return int(self.bins[value])

    @tool
    def state(self) -> dict:
        return {"total": int(self.bins.sum())}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state["total"] == calls["observe"]


class NumpySliceAccumulate(CorpusAdapter):
    """A running sum vector updated by slice assignment (``self.acc[:] = self.acc + x``)."""

    CALLS = [("accumulate", {"x": [1.0, 1.0, 1.0]})]
    FINAL = ("state", {})
    EXPECT = ("unprotected_shared_state", "acc")

    def __init__(self):
        super().__init__()
        self.acc = np.zeros(3)

    @thread_safe_method
    @tool
    def accumulate(self, x: list[float]) -> float:
        updated = self.acc + np.asarray(x)
        pause()
        self.acc[:] = updated
        return float(self.acc[0])

    @tool
    def state(self) -> dict:
        return {"first": float(self.acc[0])}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state["first"] == float(calls["accumulate"])


class NestedCountsDict(CorpusAdapter):
    """Counts kept in a dict inside a dict attribute: ``self.stats["counts"][k]``, no lock."""

    CALLS = [("count", {"word": "x"}), ("count", {"word": "y"})]
    FINAL = ("state", {})
    EXPECT = ("unprotected_shared_state", "stats")

    def __init__(self):
        super().__init__()
        self.stats = {"counts": {}, "name": "words"}

    @thread_safe_method
    @tool
    def count(self, word: str) -> int:
        counts = self.stats["counts"]
        current = counts.get(word, 0)
        pause()
        counts[word] = current + 1
        return counts[word]

    @tool
    def state(self) -> dict:
        return {"total": sum(self.stats["counts"].values())}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state["total"] == calls["count"]


class NestedRowsNoDuplicates(CorpusAdapter):
    """``self.table["rows"]``, a list inside a dict, meant to hold each id once: check, then
    append, no lock -- ids get in twice."""

    # each id four times in a row (so that its first calls overlap), 16 ids, one pass
    CALLS = [("add", {"row_id": i // 4}) for i in range(64)]
    ROUNDS = 1
    FINAL = ("state", {})
    EXPECT = ("unprotected_shared_state", "table")

    def __init__(self):
        super().__init__()
        self.table = {"rows": [], "title": "ids"}

    @thread_safe_method
    @tool
    def add(self, row_id: int) -> bool:
        rows = self.table["rows"]
        if row_id in rows:
            return False
        pause()
        rows.append(row_id)
        return True

    @tool
    def state(self) -> dict:
        rows = list(self.table["rows"])
        return {"rows": len(rows), "distinct": len(set(rows))}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state["rows"] == state["distinct"] == 16


class TokenHandedBackTooEarly(CorpusAdapter):
    """The queue-token mutex of ``safe_gen2.QueueTokenMutex``, but the token goes back before the
    write: the hand-off orders the read, not the write after it."""

    CALLS = [("add", {"n": 1})]
    FINAL = ("state", {})
    EXPECT = ("unprotected_shared_state", "total")

    def __init__(self):
        super().__init__()
        self._token = queue.Queue(maxsize=1)
        self._token.put("token")
        self.total = 0

    @thread_safe_method
    @tool
    def add(self, n: int) -> int:
        token = self._token.get()
        value = self.total
        self._token.put(token)
        pause()
        self.total = value + n
        return value + n

    @tool
    def state(self) -> dict:
        return {"total": self.total}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state["total"] == calls["add"]


class LazyInitCheckedOutsideOnly(CorpusAdapter):
    """Lazy initialisation that builds the (slow) model outside the lock and publishes it under the
    lock without checking again: every call that arrives while the first build runs builds too."""

    CALLS = [("predict", {"x": 2})]
    FINAL = ("state", {})
    EXPECT = ("unprotected_shared_state", "model")

    def __init__(self):
        super().__init__()
        self._init_lock = threading.Lock()
        self.model = None
        self.builds = 0

    @thread_safe_method
    @tool
    def predict(self, x: int) -> int:
        if self.model is None:
            time.sleep(0.05)                 # building takes a while
            model = (3, "model")
            with self._init_lock:
                self.builds += 1
                self.model = model
        return self.model[0] * x

    @tool
    def state(self) -> dict:
        with self._init_lock:
            return {"builds": self.builds}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state == {"builds": 1}
