"""Adapters with real races. Each wrongly declares ``__thread_safe__ = True``; the checker must
report the attribute (or library) named in ``EXPECT``."""
from __future__ import annotations

import sqlite3
import threading

from snakepit_bridge.base_adapter_threaded import thread_safe_method, tool

from ._base import CorpusAdapter, pause


class UnlockedCounter(CorpusAdapter):
    """``self.counter += 1`` with no lock: lost updates."""

    CALLS = [("increment", {})]
    EXPECT = ("unprotected_shared_state", "counter")

    def __init__(self):
        super().__init__()
        self.counter = 0

    @thread_safe_method
    @tool
    def increment(self) -> int:
        value = self.counter
        pause()
        self.counter = value + 1
        return self.counter


class UnlockedAugmentedCounter(CorpusAdapter):
    """The guide's pitfall 1 exactly: ``self.counter += 1``."""

    CALLS = [("increment", {})]
    EXPECT = ("unprotected_shared_state", "counter")

    def __init__(self):
        super().__init__()
        self.counter = 0

    @thread_safe_method
    @tool
    def increment(self) -> None:
        self.counter += 1  # NOT thread-safe!


class UnlockedListAppend(CorpusAdapter):
    """``self.results.append(...)`` from every thread, no lock."""

    CALLS = [("record", {"value": 1})]
    EXPECT = ("unprotected_shared_state", "results")

    def __init__(self):
        super().__init__()
        self.results = []

    @thread_safe_method
    @tool
    def record(self, value: int) -> int:
        self.results.append(value)
        pause()
        return len(self.results)


class CheckThenActDict(CorpusAdapter):
    """``if key not in self.cache: self.cache[key] = ...``: two threads both miss and both compute."""

    CALLS = [("lookup", {"key": "a"}), ("lookup", {"key": "b"}), ("lookup", {"key": "c"})]
    EXPECT = ("unprotected_shared_state", "cache")

    def __init__(self):
        super().__init__()
        self.cache = {}

    @tool
    @thread_safe_method
    def lookup(self, key: str) -> str:
        if key not in self.cache:
            pause()
            self.cache[key] = key.upper()
        return self.cache[key]


class LazyInitWithoutLock(CorpusAdapter):
    """``if self.model is None: self.model = build()`` with no lock: several threads build it."""

    CALLS = [("predict", {"x": 2})]
    EXPECT = ("unprotected_shared_state", "model")

    def __init__(self):
        super().__init__()
        self.model = None

    @thread_safe_method
    @tool
    def predict(self, x: int) -> int:
        if self.model is None:
            pause()
            self.model = {"factor": 3}
        return self.model["factor"] * x


class LockOnOneWriterOnly(CorpusAdapter):
    """``add`` takes the adapter lock, ``subtract`` does not: the lock protects nothing."""

    CALLS = [("add", {"n": 2}), ("subtract", {"n": 1})]
    EXPECT = ("unprotected_shared_state", "total")

    def __init__(self):
        super().__init__()
        self.total = 0

    @thread_safe_method
    @tool
    def add(self, n: int) -> int:
        with self.acquire_lock():
            self.total += n
            return self.total

    @thread_safe_method
    @tool
    def subtract(self, n: int) -> int:
        self.total -= n
        return self.total


class OwnLockOnOneWriterOnly(CorpusAdapter):
    """Its own ``threading.Lock`` guards deposits but not withdrawals."""

    CALLS = [("deposit", {"amount": 5}), ("withdraw", {"amount": 1})]
    EXPECT = ("unprotected_shared_state", "balance")

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self.balance = 100

    @thread_safe_method
    @tool
    def deposit(self, amount: int) -> int:
        with self._lock:
            self.balance += amount
            return self.balance

    @thread_safe_method
    @tool
    def withdraw(self, amount: int) -> int:
        if self.balance >= amount:
            pause()
            self.balance -= amount
        return self.balance


class TwoDifferentLocks(CorpusAdapter):
    """Each writer holds a lock, but not the same one: no lock in common."""

    CALLS = [("via_adapter_lock", {}), ("via_own_lock", {})]
    EXPECT = ("unprotected_shared_state", "events")

    def __init__(self):
        super().__init__()
        self._other_lock = threading.Lock()
        self.events = 0

    @thread_safe_method
    @tool
    def via_adapter_lock(self) -> int:
        with self.acquire_lock():
            self.events += 1
            return self.events

    @thread_safe_method
    @tool
    def via_own_lock(self) -> int:
        with self._other_lock:
            self.events += 1
            return self.events


class UnlockedDictIncrement(CorpusAdapter):
    """``self.counts[w] = self.counts.get(w, 0) + 1`` with no lock."""

    CALLS = [("count", {"word": "x"}), ("count", {"word": "y"})]
    EXPECT = ("unprotected_shared_state", "counts")

    def __init__(self):
        super().__init__()
        self.counts = {}

    @thread_safe_method
    @tool
    def count(self, word: str) -> int:
        current = self.counts.get(word, 0)
        pause()
        self.counts[word] = current + 1
        return self.counts[word]


class UnlockedSetAdd(CorpusAdapter):
    """A de-duplication set filled by every thread with no lock."""

    CALLS = [("first_time", {"item": "a"}), ("first_time", {"item": "b"})]
    EXPECT = ("unprotected_shared_state", "seen")

    def __init__(self):
        super().__init__()
        self.seen = set()

    @thread_safe_method
    @tool
    def first_time(self, item: str) -> bool:
        if item in self.seen:
            return False
        pause()
        self.seen.add(item)
        return True


class MutationInHelper(CorpusAdapter):
    """The unlocked write is in a helper method the tool calls, and the tool has no
    ``@thread_safe_method`` (plain ``@tool``)."""

    CALLS = [("handle", {"payload": "p"})]
    EXPECT = ("unprotected_shared_state", "last_payload")

    def __init__(self):
        super().__init__()
        self.last_payload = None

    def _remember(self, payload):
        self.last_payload = payload

    @tool
    def handle(self, payload: str) -> str:
        self._remember(payload)
        pause()
        return str(self.last_payload)


class RebindSharedList(CorpusAdapter):
    """``self.batch = self.batch + [x]``: read, build, rebind; updates are lost."""

    CALLS = [("push", {"x": 1})]
    EXPECT = ("unprotected_shared_state", "batch")

    def __init__(self):
        super().__init__()
        self.batch = []

    @thread_safe_method
    @tool
    def push(self, x: int) -> int:
        batch = self.batch
        pause()
        self.batch = batch + [x]
        return len(self.batch)


class SharedSqliteConnection(CorpusAdapter):
    """One sqlite3 connection (``check_same_thread=False``) used by every thread."""

    CALLS = [("insert", {"value": 1}), ("count_rows", {})]
    EXPECT = ("unsafe_library", "sqlite3")

    def setup(self):
        super().setup()
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.conn.execute("CREATE TABLE t (value INTEGER)")

    @thread_safe_method
    @tool
    def insert(self, value: int) -> None:
        self.conn.execute("INSERT INTO t VALUES (?)", (value,))

    @thread_safe_method
    @tool
    def count_rows(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]


class PandasPerCallWithoutLock(CorpusAdapter):
    """The guide's pitfall 3 (wrong version): pandas used from every thread with no lock."""

    CALLS = [("process_data", {"data": {"category": ["a", "b", "a"], "value": [1, 2, 3]}})]
    EXPECT = ("unsafe_library", "pandas")
    NEEDS = "pandas"

    @thread_safe_method
    @tool
    def process_data(self, data: dict) -> dict:
        import pandas as pd

        df = pd.DataFrame(data)
        return {k: int(v) for k, v in df.groupby('category')["value"].sum().items()}


class SharedDataFrame(CorpusAdapter):
    """One DataFrame, built in setup(), read and written by every thread with no lock."""

    CALLS = [("append_row", {"v": 1}), ("total", {})]
    EXPECT = ("unsafe_library", "pandas")
    NEEDS = "pandas"

    def setup(self):
        super().setup()
        import pandas as pd

        self.frame = pd.DataFrame({"v": [0]})

    @thread_safe_method
    @tool
    def append_row(self, v: int) -> int:
        self.frame.loc[len(self.frame)] = [v]
        return len(self.frame)

    @thread_safe_method
    @tool
    def total(self) -> int:
        return int(self.frame["v"].sum())


class PyplotStateMachine(CorpusAdapter):
    """matplotlib.pyplot's global current-figure state used from every thread."""

    CALLS = [("plot", {"values": [1.0, 2.0, 3.0]})]
    EXPECT = ("unsafe_library", "matplotlib")
    NEEDS = "matplotlib"

    def setup(self):
        super().setup()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

    @thread_safe_method
    @tool
    def plot(self, values: list[float]) -> int:
        import io

        import matplotlib.pyplot as plt

        plt.figure()
        plt.plot(values)
        buffer = io.BytesIO()
        plt.savefig(buffer, format="png")
        plt.close()
        return len(buffer.getvalue())
