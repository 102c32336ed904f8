"""Correct adapters the first-generation (lockset-only) checker flagged: ordered by a hand-off
(queue, event, semaphore, thread start/join, futures), keyed by thread, or published once.

Each declares ``CALLS`` (made many times from many clients at once), ``FINAL`` (a call made after
them that returns the adapter's state) and ``invariant(state, calls, results)`` (``calls``: how
many times each tool was called; ``results``: what the calls returned); the test checks the
checker reports nothing *and* the invariant holds.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading

from snakepit_bridge.base_adapter_threaded import thread_safe_method, tool

from ._base import CorpusAdapter, pause


class QueueTokenMutex(CorpusAdapter):
    """A one-slot ``queue.Queue`` holding a token is the mutex: ``get`` it, change the state,
    ``put`` it back (the shape of a resource pool of size one)."""

    CALLS = [("add", {"n": 2})]
    FINAL = ("state", {})

    def __init__(self):
        super().__init__()
        self._token = queue.Queue(maxsize=1)
        self._token.put("token")
        self.total = 0
        self.history = []

    @thread_safe_method
    @tool
    def add(self, n: int) -> int:
        token = self._token.get()
        try:
            value = self.total
            pause()
            self.total = value + n
            self.history.append(n)
            return self.total
        finally:
            self._token.put(token)

    @tool
    def state(self) -> dict:
        token = self._token.get()
        try:
            return {"total": self.total, "entries": len(self.history)}
        finally:
            self._token.put(token)

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state == {"total": 2 * calls["add"], "entries": calls["add"]}


class SemaphoreGuarded(CorpusAdapter):
    """``threading.BoundedSemaphore(1)`` used as the mutex (acquire -> change -> release)."""

    CALLS = [("deposit", {"amount": 3}), ("withdraw", {"amount": 1})]
    FINAL = ("state", {})

    def __init__(self):
        super().__init__()
        self._slot = threading.BoundedSemaphore(1)
        self.balance = 0

    @thread_safe_method
    @tool
    def deposit(self, amount: int) -> int:
        with self._slot:
            value = self.balance
            pause()
            self.balance = value + amount
            return self.balance

    @thread_safe_method
    @tool
    def withdraw(self, amount: int) -> int:
        self._slot.acquire()
        try:
            value = self.balance
            pause()
            self.balance = value - amount
            return self.balance
        finally:
            self._slot.release()

    @tool
    def state(self) -> dict:
        with self._slot:
            return {"balance": self.balance}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state["balance"] == 3 * calls["deposit"] - calls["withdraw"]


class BackgroundLoadThenEvent(CorpusAdapter):
    """``setup()`` starts a loader thread that builds the model and its vocabulary, then sets an
    ``Event``; every tool waits on the event and only then reads what the loader wrote."""

    CALLS = [("predict", {"word": "b"})]
    FINAL = ("state", {})

    def setup(self):
        super().setup()
        self.ready = threading.Event()
        self.model = None
        self.vocabulary = {}
        threading.Thread(target=self._load, name="loader", daemon=True).start()

    def _load(self):
        pause()
        for i, word in enumerate("abcd"):
            self.vocabulary[word] = i
        self.model = {"factor": 10}
        self.ready.set()

    @thread_safe_method
    @tool
    def predict(self, word: str) -> int:
        self.ready.wait(10)
        return self.model["factor"] * self.vocabulary[word]

    @tool
    def state(self) -> dict:
        self.ready.wait(10)
        return {"words": len(self.vocabulary), "factor": self.model["factor"]}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state == {"words": 4, "factor": 10}


class OffloadToThreadAndJoin(CorpusAdapter):
    """Under the adapter lock, a tool starts a helper thread that computes into an attribute,
    joins it, then reads the result: the helper holds no lock, start/join order it."""

    CALLS = [("compute", {"x": 4})]
    FINAL = ("state", {})

    def __init__(self):
        super().__init__()
        self.result = 0
        self.runs = 0

    def _helper(self, x: int) -> None:
        pause()
        self.result = x * x
        self.runs += 1

    @thread_safe_method
    @tool
    def compute(self, x: int) -> int:
        with self.acquire_lock():
            helper = threading.Thread(target=self._helper, args=(x,))
            helper.start()
            helper.join()
            return self.result

    @tool
    def state(self) -> dict:
        with self.acquire_lock():
            return {"runs": self.runs, "result": self.result}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state == {"runs": calls["compute"], "result": 16}


class ExecutorRefreshUnderLock(CorpusAdapter):
    """The adapter's own ``ThreadPoolExecutor`` refreshes a snapshot (no lock in the pool thread);
    the tool submits under the adapter lock and waits on ``result()`` before reading it."""

    CALLS = [("refresh", {"n": 1})]
    FINAL = ("state", {})

    def __init__(self):
        super().__init__()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="refresh")
        self.snapshot = {"version": 0}
        self.version = 0

    def _rebuild(self, n: int) -> int:
        value = self.version
        pause()
        self.version = value + n
        self.snapshot = {"version": self.version}
        return self.version

    @thread_safe_method
    @tool
    def refresh(self, n: int) -> int:
        with self.acquire_lock():
            self._pool.submit(self._rebuild, n).result(10)
            return self.snapshot["version"]

    @tool
    def state(self) -> dict:
        with self.acquire_lock():
            return {"version": self.version, "snapshot": self.snapshot["version"]}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state == {"version": calls["refresh"], "snapshot": calls["refresh"]}


class DictKeyedByThread(CorpusAdapter):
    """Per-thread tallies in one dict keyed by the thread's name: every thread reads and writes
    only its own key, with no lock (distinct keys of a dict do not race); a thread's key is added,
    once, under the lock, and nothing reads another thread's tally."""

    CALLS = [("hit", {})]
    FINAL = ("threads", {})

    def __init__(self):
        super().__init__()
        self.per_thread = {}

    @thread_safe_method
    @tool
    def hit(self) -> dict:
        me = threading.current_thread().name
        if me not in self.per_thread:
            with self.acquire_lock():
                self.per_thread[me] = 0
        value = self.per_thread[me]
        pause()
        self.per_thread[me] = value + 1
        return {"thread": me, "n": self.per_thread[me]}

    @tool
    def threads(self) -> dict:
        with self.acquire_lock():       # the key set changes only under the lock
            return {"threads": len(self.per_thread)}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        """Each thread's tallies, as its calls returned them, are 1, 2, ... n: none lost."""
        seen: dict = {}
        for r in results:
            seen.setdefault(r["thread"], []).append(r["n"])
        return len(seen) == state["threads"] and \
            all(sorted(ns) == list(range(1, len(ns) + 1)) for ns in seen.values())


class DoubleCheckedModel(CorpusAdapter):
    """Double-checked locking of an object never changed after it is built: checked without the
    lock, built and published once under it, read without it."""

    CALLS = [("predict", {"x": 2})]
    FINAL = ("state", {})

    def __init__(self):
        super().__init__()
        self._init_lock = threading.Lock()
        self.model = None
        self.builds = 0

    def _get_model(self):
        model = self.model
        if model is None:
            with self._init_lock:
                if self.model is None:
                    pause()
                    self.builds += 1
                    self.model = (3, "model")
                model = self.model
        return model

    @thread_safe_method
    @tool
    def predict(self, x: int) -> int:
        return self._get_model()[0] * x

    @tool
    def state(self) -> dict:
        with self._init_lock:
            return {"builds": self.builds}

    @staticmethod
    def invariant(state: dict, calls: dict, results: list) -> bool:
        return state == {"builds": 1}
