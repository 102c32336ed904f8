"""Correct adapters: locked, thread-local, read-only, immutable. The checker must not flag them."""
from __future__ import annotations

import queue
import sqlite3
import threading

import numpy as np

from snakepit_bridge.base_adapter_threaded import thread_safe_method, tool

from ._base import CorpusAdapter, pause


class LockedCounter(CorpusAdapter):
    """The guide's pitfall 1, corrected: every access under ``self.acquire_lock()``."""

    CALLS = [("increment", {}), ("read", {})]

    def __init__(self):
        super().__init__()
        self.counter = 0

    @thread_safe_method
    @tool
    def increment(self) -> int:
        with self.acquire_lock():
            value = self.counter
            pause()
            self.counter = value + 1
            return self.counter

    @thread_safe_method
    @tool
    def read(self) -> int:
        with self.acquire_lock():
            return self.counter


class OwnLockEverywhere(CorpusAdapter):
    """Its own ``threading.Lock`` around every reader and writer."""

    CALLS = [("deposit", {"amount": 5}), ("withdraw", {"amount": 1}), ("balance_now", {})]

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
        with self._lock:
            if self.balance >= amount:
                self.balance -= amount
            return self.balance

    @tool
    def balance_now(self) -> int:
        with self._lock:
            return self.balance


class LockedLogAppend(CorpusAdapter):
    """The guide's pattern 3: a shared log and counter changed only under the lock, with the
    computation done outside it."""

    CALLS = [("log_prediction", {"prediction": 0.5}), ("summary", {})]

    def __init__(self):
        super().__init__()
        self.prediction_log = []
        self.total_predictions = 0

    @thread_safe_method
    @tool
    def log_prediction(self, prediction: float) -> int:
        result = float(np.sqrt(prediction))           # no lock while computing
        with self.acquire_lock():
            self.prediction_log.append({"prediction": result})
            self.total_predictions += 1
            return self.total_predictions

    @thread_safe_method
    @tool
    def summary(self) -> dict:
        with self.acquire_lock():
            return {"count": len(self.prediction_log), "total": self.total_predictions}


class ThreadLocalCache(CorpusAdapter):
    """The guide's pattern 2: a per-thread cache through get/set_thread_local."""

    CALLS = [("compute", {"key": "a"}), ("compute", {"key": "b"})]

    @thread_safe_method
    @tool
    def compute(self, key: str) -> dict:
        cache = self.get_thread_local('cache', {})
        if key in cache:
            return {"value": cache[key], "cached": True}
        pause()
        result = len(key) * 7
        cache[key] = result
        self.set_thread_local('cache', cache)
        return {"value": result, "cached": False}


class UserThreadLocal(CorpusAdapter):
    """Its own ``threading.local()`` attribute; each thread writes only its own slot."""

    CALLS = [("bump", {})]

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    @thread_safe_method
    @tool
    def bump(self) -> int:
        self._local.count = getattr(self._local, "count", 0) + 1
        return self._local.count


class ReadOnlySharedModel(CorpusAdapter):
    """The guide's pattern 1: model, config and lookup table built once, then only read."""

    CALLS = [("predict", {"values": [1.0, 2.0, 3.0, 4.0]}), ("label", {"index": 2})]

    def __init__(self):
        super().__init__()
        self.weights = np.arange(16, dtype=np.float64).reshape(4, 4)
        self.config = {"timeout": 30, "batch_size": 10}
        self.labels = ["zero", "one", "two", "three"]

    @thread_safe_method
    @tool
    def predict(self, values: list[float]) -> list[float]:
        pause()
        scale = self.config["batch_size"]
        return (np.asarray(values) @ self.weights / scale).tolist()

    @thread_safe_method
    @tool
    def label(self, index: int) -> str:
        return self.labels[index % len(self.labels)]


class StateBuiltInSetup(CorpusAdapter):
    """Mutable containers filled in ``setup()`` (before serving) and only read afterwards."""

    CALLS = [("lookup", {"word": "b"})]

    def setup(self):
        super().setup()
        self.index = {}
        for i, word in enumerate(["a", "b", "c"]):
            self.index[word] = i
        self.words = []
        self.words.extend(self.index)

    @thread_safe_method
    @tool
    def lookup(self, word: str) -> int:
        pause()
        return self.index.get(word, -1) + len(self.words)


class ImmutableState(CorpusAdapter):
    """Tuples, frozensets and strings: nothing can change them."""

    CALLS = [("classify", {"word": "b"})]

    def __init__(self):
        super().__init__()
        self.vocabulary = frozenset({"a", "b", "c"})
        self.order = ("a", "b", "c")
        self.name = "immutable"

    @thread_safe_method
    @tool
    def classify(self, word: str) -> dict:
        return {"known": word in self.vocabulary,
                "position": self.order.index(word) if word in self.vocabulary else -1,
                "by": self.name}


class LazyInitUnderLock(CorpusAdapter):
    """Lazy initialisation done right: check and create under one lock."""

    CALLS = [("predict", {"x": 2})]

    def __init__(self):
        super().__init__()
        self.model = None

    @thread_safe_method
    @tool
    def predict(self, x: int) -> int:
        with self.acquire_lock():
            if self.model is None:
                pause()
                self.model = {"factor": 3}
            model = self.model
        return model["factor"] * x


class ConditionGuarded(CorpusAdapter):
    """A ``threading.Condition`` guards a shared queue of work."""

    CALLS = [("produce", {"item": 1}), ("consume", {})]

    def __init__(self):
        super().__init__()
        self._ready = threading.Condition()
        self.pending = []

    @thread_safe_method
    @tool
    def produce(self, item: int) -> int:
        with self._ready:
            self.pending.append(item)
            self._ready.notify()
            return len(self.pending)

    @thread_safe_method
    @tool
    def consume(self) -> int:
        with self._ready:
            self._ready.wait_for(lambda: bool(self.pending), timeout=0.01)
            return self.pending.pop() if self.pending else -1


class ThreadSafeQueue(CorpusAdapter):
    """A ``queue.Queue`` (internally locked) shared by every thread; the attribute never changes."""

    CALLS = [("put", {"item": 1}), ("drain", {})]

    def __init__(self):
        super().__init__()
        self.jobs = queue.Queue()

    @thread_safe_method
    @tool
    def put(self, item: int) -> int:
        self.jobs.put(item)
        return 1

    @thread_safe_method
    @tool
    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                return n
            n += 1


class SqliteConnectionPerThread(CorpusAdapter):
    """The guide's advice for SQLite3: a connection per thread (thread-local)."""

    CALLS = [("insert", {"value": 1}), ("count_rows", {})]

    def _conn(self):
        conn = self.get_thread_local("conn")
        if conn is None:
            conn = sqlite3.connect(":memory:")
            conn.execute("CREATE TABLE t (value INTEGER)")
            self.set_thread_local("conn", conn)
        return conn

    @thread_safe_method
    @tool
    def insert(self, value: int) -> None:
        self._conn().execute("INSERT INTO t VALUES (?)", (value,))

    @thread_safe_method
    @tool
    def count_rows(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM t").fetchone()[0]


class SharedSqliteUnderLock(CorpusAdapter):
    """One sqlite3 connection, but every use holds the adapter lock."""

    CALLS = [("insert", {"value": 1}), ("count_rows", {})]

    def setup(self):
        super().setup()
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.conn.execute("CREATE TABLE t (value INTEGER)")

    @thread_safe_method
    @tool
    def insert(self, value: int) -> None:
        with self.acquire_lock():
            self.conn.execute("INSERT INTO t VALUES (?)", (value,))

    @thread_safe_method
    @tool
    def count_rows(self) -> int:
        with self.acquire_lock():
            return self.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]


class PandasUnderLock(CorpusAdapter):
    """The guide's pitfall 3, corrected: pandas only under the adapter lock."""

    CALLS = [("process_data", {"data": {"category": ["a", "b", "a"], "value": [1, 2, 3]}})]
    NEEDS = "pandas"

    @thread_safe_method
    @tool
    def process_data(self, data: dict) -> dict:
        import pandas as pd

        with self.acquire_lock():
            df = pd.DataFrame(data)
            return {k: int(v) for k, v in df.groupby('category')["value"].sum().items()}
