"""Adapters that the threaded server may call from many threads at once.

    from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter, thread_safe_method, tool

    class MyAdapter(ThreadSafeAdapter):
        __thread_safe__ = True          # the declaration the threaded server requires

        @thread_safe_method
        @tool(description="...")
        def predict(self, x: str) -> dict:
            ...

* ``__thread_safe__ = True`` on the class is the author's promise that every tool may run in several
  threads at once. ``ThreadSafeAdapter`` itself does *not* declare it: a subclass must.
* ``acquire_lock(timeout=None)`` is a context manager over the adapter's re-entrant lock.
* ``get_thread_local`` / ``set_thread_local`` / ``clear_thread_local`` keep per-thread state that
  survives across the requests one pool thread serves.
* ``@thread_safe_method`` counts every call (active, total, per thread, peak concurrency, errors,
  latency) and tells the active :class:`~snakepit_bridge.thread_safety_checker.ThreadSafetyChecker`
  about it. It uses ``functools.wraps``, so its order with ``@tool`` does not matter.
* ``get_stats()`` summarises those counters (the server publishes it through ``GetStats``).
"""
from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import Any, Callable, Optional

from ..contract.adapter import BaseAdapter, tool

# the declaration's rule and gate, part of this module's API since the guide's first version
from .declaration import UnsafeAdapterError, is_declared_thread_safe, require_thread_safe_declaration
from .hooks import CheckerHooks, get_active_checker
from .interpreter import gil_enabled

__all__ = [
    "ThreadSafeAdapter",
    "thread_safe_method",
    "tool",
    "LockTimeoutError",
    "UnsafeAdapterError",
    "is_declared_thread_safe",
    "require_thread_safe_declaration",
]

_perf = time.perf_counter
_get_ident = threading.get_ident
_current_thread = threading.current_thread


class LockTimeoutError(TimeoutError):
    """``acquire_lock(timeout=...)`` could not take the adapter lock in time."""


# ---------------------------------------------------------------------------------------------
# Call statistics
# ---------------------------------------------------------------------------------------------

class _ThreadRecord:
    """One thread's counters for one adapter. Only its own thread writes them (no lock)."""

    __slots__ = ("token", "name", "depth", "started", "requests", "errors", "busy", "methods")

    def __init__(self, token: int, name: str) -> None:
        self.token = token
        self.name = name
        self.depth = 0            # nesting of tracked calls in this thread
        self.started = 0          # requests (outermost tracked calls) started
        self.requests = 0         # ... and finished
        self.errors = 0
        self.busy = 0.0
        self.methods: dict[str, list] = {}   # name -> [calls, errors, total_s, max_s]


_token_lock = threading.Lock()
_token_next = [0]


class _MethodState:
    __slots__ = ("inside", "peak")

    def __init__(self) -> None:
        self.inside: set[int] = set()   # tokens of the threads inside the method now
        self.peak = 0                   # most threads inside it at the same time


class _CallStats:
    """Counters of one adapter instance.

    The hot path takes no lock: each thread counts in its own record, and the threads inside the
    adapter (and inside each method) are kept in sets, whose add/discard are atomic. A lock is
    taken only for a thread's first call, a method's first call and a new peak."""

    __slots__ = ("lock", "started", "local", "records", "active", "peak", "methods")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.local = threading.local()
        self.records: list[_ThreadRecord] = []
        self.active: set[int] = set()
        self.peak = 0
        self.methods: dict[str, _MethodState] = {}

    def record(self) -> _ThreadRecord:
        try:
            return self.local.rec
        except AttributeError:
            pass
        with _token_lock:
            _token_next[0] += 1
            token = _token_next[0]
        rec = _ThreadRecord(token, _current_thread().name)
        self.local.rec = rec
        with self.lock:
            self.records.append(rec)
        return rec

    def method(self, name: str) -> _MethodState:
        m = self.methods.get(name)
        if m is None:
            with self.lock:
                m = self.methods.setdefault(name, _MethodState())
        return m

    def new_peak(self, m: Optional[_MethodState], n: int) -> None:
        with self.lock:
            if m is None:
                if n > self.peak:
                    self.peak = n
            elif n > m.peak:
                m.peak = n

    def enter(self, name: str):
        """Start of a tracked call in this thread; returns what exit() needs."""
        try:
            rec = self.local.rec
        except AttributeError:
            rec = self.record()
        token = rec.token
        outer = rec.depth == 0
        rec.depth += 1
        if outer:
            rec.started += 1
            active = self.active
            active.add(token)
            if len(active) > self.peak:
                self.new_peak(None, len(active))
        m = self.methods.get(name)
        if m is None:
            m = self.method(name)
        inside = m.inside
        first_in_method = token not in inside
        if first_in_method:
            inside.add(token)
            if len(inside) > m.peak:
                self.new_peak(m, len(inside))
        return rec, m, outer, first_in_method

    def exit(self, entered, name: str, elapsed: float, failed: bool) -> None:
        rec, m, outer, first_in_method = entered
        c = rec.methods.get(name)
        if c is None:
            c = rec.methods[name] = [0, 0, 0.0, 0.0]
        c[0] += 1
        c[2] += elapsed
        if elapsed > c[3]:
            c[3] = elapsed
        if failed:
            c[1] += 1
        if first_in_method:
            m.inside.discard(rec.token)
        rec.depth -= 1
        if outer:
            self.active.discard(rec.token)
            rec.requests += 1
            rec.busy += elapsed
            if failed:
                rec.errors += 1

    def snapshot(self) -> dict:
        with self.lock:
            records = list(self.records)
            states = {name: (len(m.inside), m.peak) for name, m in self.methods.items()}
            peak = self.peak
        uptime = max(time.time() - self.started, 1e-9)
        threads: dict[str, dict] = {}
        methods: dict[str, dict] = {name: {"calls": 0, "errors": 0, "total_s": 0.0, "max_s": 0.0, "threads": {}}
                                    for name in states}
        for rec in records:
            t = threads.setdefault(rec.name, {"requests": 0, "busy_seconds": 0.0})
            t["requests"] += rec.requests
            t["busy_seconds"] += rec.busy
            for name, (calls, errors, total_s, max_s) in list(rec.methods.items()):
                m = methods.setdefault(name, {"calls": 0, "errors": 0, "total_s": 0.0, "max_s": 0.0,
                                              "threads": {}})
                m["calls"] += calls
                m["errors"] += errors
                m["total_s"] += total_s
                m["max_s"] = max(m["max_s"], max_s)
                m["threads"][rec.name] = m["threads"].get(rec.name, 0) + calls
        for t in threads.values():
            t["busy_fraction"] = t["busy_seconds"] / uptime
        out_methods = {}
        for name, m in methods.items():
            active, mpeak = states.get(name, (0, 0))
            out_methods[name] = {
                "calls": m["calls"],
                "errors": m["errors"],
                "active": active,
                "peak_concurrency": mpeak,
                "mean_ms": m["total_s"] / m["calls"] * 1000.0 if m["calls"] else 0.0,
                "max_ms": m["max_s"] * 1000.0,
                "threads": m["threads"],
            }
        return {
            "total_requests": sum(r.started for r in records),
            "active_requests": len(self.active),
            "peak_concurrency": peak,
            "errors": sum(r.errors for r in records),
            "thread_utilization": threads,
            "methods": out_methods,
            "uptime_seconds": uptime,
        }


_fallback_stats_lock = threading.Lock()


def _stats_of(obj: Any) -> _CallStats:
    try:
        return obj._sp_stats
    except AttributeError:
        pass
    # @thread_safe_method on a class that is not a ThreadSafeAdapter (or before its __init__ ran).
    with _fallback_stats_lock:
        st = obj.__dict__.get("_sp_stats")
        if st is None:
            st = _CallStats()
            object.__setattr__(obj, "_sp_stats", st)
        return st


def thread_safe_method(fn: Callable) -> Callable:
    """Track every call of an adapter method: active now, total, per thread, peak concurrency,
    errors and latency (see :meth:`ThreadSafeAdapter.get_stats`), and report it to the active
    thread-safety checker when one is enabled. Works on plain, generator and async methods, and
    keeps ``__snakepit_tool__``/``__wrapped__`` (``functools.wraps``), so ``@tool`` may go above
    or below it."""
    if getattr(fn, "__snakepit_thread_safe__", False):
        return fn
    name = fn.__name__

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(self, *args, **kwargs):
            stats = _stats_of(self)
            checker = get_active_checker()
            token = checker.method_entered(self, name) if checker is not None else None
            rec = stats.enter(name)
            t0 = _perf()
            failed = True
            try:
                result = yield from fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                stats.exit(rec, name, _perf() - t0, failed)
                if checker is not None:
                    checker.method_exited(token)
        wrapper = gen_wrapper
    elif inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(self, *args, **kwargs):
            stats = _stats_of(self)
            checker = get_active_checker()
            token = checker.method_entered(self, name) if checker is not None else None
            rec = stats.enter(name)
            t0 = _perf()
            failed = True
            try:
                result = await fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                stats.exit(rec, name, _perf() - t0, failed)
                if checker is not None:
                    checker.method_exited(token)
        wrapper = async_wrapper
    else:
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            try:
                stats = self._sp_stats
            except AttributeError:
                stats = _stats_of(self)
            checker = get_active_checker()
            if checker is None:
                rec = stats.enter(name)
                t0 = _perf()
                try:
                    result = fn(self, *args, **kwargs)
                except BaseException:
                    stats.exit(rec, name, _perf() - t0, True)
                    raise
                stats.exit(rec, name, _perf() - t0, False)
                return result
            token = checker.method_entered(self, name)
            rec = stats.enter(name)
            t0 = _perf()
            failed = True
            try:
                result = fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                stats.exit(rec, name, _perf() - t0, failed)
                checker.method_exited(token)

    setattr(wrapper, "__snakepit_thread_safe__", True)
    return wrapper


# ---------------------------------------------------------------------------------------------
# The adapter lock
# ---------------------------------------------------------------------------------------------

class _LockContext:
    """What ``acquire_lock()`` returns: ``with adapter.acquire_lock(timeout=2.0): ...``."""

    __slots__ = ("_adapter", "_lock", "_timeout", "_checker")

    def __init__(self, adapter: "ThreadSafeAdapter", lock, timeout: Optional[float]) -> None:
        self._adapter = adapter
        self._lock = lock
        self._timeout = timeout
        self._checker: Optional[CheckerHooks] = None   # the one told of the acquisition

    def __enter__(self):
        lock = self._lock
        timeout = self._timeout
        if timeout is None:
            lock.acquire()
        elif not lock.acquire(timeout=timeout):
            adapter = self._adapter
            owner = adapter._sp_lock_owner
            raise LockTimeoutError(
                f"{type(adapter).__qualname__}.acquire_lock(timeout={timeout}): the adapter lock "
                f"was not acquired within {timeout} s"
                + (f" (it is held by thread {owner!r})" if owner else "")
                + "; the protected code did not run.")
        adapter = self._adapter
        if adapter._sp_lock_depth_of_owner == 0 or adapter._sp_lock_owner_ident != _get_ident():
            adapter._sp_lock_owner = _current_thread().name
            adapter._sp_lock_owner_ident = _get_ident()
            adapter._sp_lock_depth_of_owner = 0
        adapter._sp_lock_depth_of_owner += 1
        checker = get_active_checker()
        if checker is not None:
            checker.lock_acquired(lock)
            self._checker = checker
        return lock

    def __exit__(self, exc_type, exc, tb):
        checker = self._checker
        if checker is not None:
            self._checker = None
            checker.lock_released(self._lock)
        adapter = self._adapter
        adapter._sp_lock_depth_of_owner -= 1
        if adapter._sp_lock_depth_of_owner == 0:
            adapter._sp_lock_owner = None
            adapter._sp_lock_owner_ident = None
        self._lock.release()
        return False


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------

class ThreadSafeAdapter(BaseAdapter):
    """Base class for adapters whose tools may run in many threads at once.

    Subclasses declare ``__thread_safe__ = True`` (this base class does not) and call
    ``super().__init__()``. Attributes whose names start with ``_sp_`` belong to this class.
    """

    __thread_safe__ = False
    _sp_lock: threading.RLock
    _sp_tls: threading.local

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_sp_lock", threading.RLock())
        object.__setattr__(self, "_sp_lock_owner", None)
        object.__setattr__(self, "_sp_lock_owner_ident", None)
        object.__setattr__(self, "_sp_lock_depth_of_owner", 0)
        object.__setattr__(self, "_sp_tls", threading.local())
        object.__setattr__(self, "_sp_stats", _CallStats())
        checker = get_active_checker()
        if checker is not None:
            # Everything the constructing thread does until the adapter starts serving (a call of a
            # tracked method, another thread touching it, or the server's checker.attach()) is
            # initialisation, not shared access.
            checker.adapter_created(self)

    # -- locking -------------------------------------------------------------------------------

    def acquire_lock(self, timeout: Optional[float] = None) -> _LockContext:
        """``with self.acquire_lock():`` holds the adapter's re-entrant lock for the block.

        With ``timeout`` (seconds) a lock that cannot be taken in time raises
        :class:`LockTimeoutError` and the block does not run."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"acquire_lock: timeout must be >= 0 or None, not {timeout!r}")
        return _LockContext(self, self._sp_lock, timeout)

    # -- per-thread state ----------------------------------------------------------------------

    def get_thread_local(self, key: str, default: Any = None) -> Any:
        """This thread's value for ``key`` (``default`` when unset; the default is not stored)."""
        return self._sp_tls.__dict__.get(key, default)

    def set_thread_local(self, key: str, value: Any) -> None:
        """Set this thread's value for ``key``; other threads never see it. It stays for the next
        requests this pool thread serves, until cleared."""
        self._sp_tls.__dict__[key] = value

    def clear_thread_local(self, key: Optional[str] = None) -> None:
        """Forget this thread's value for ``key``, or all of this thread's values when ``key`` is
        None."""
        d = self._sp_tls.__dict__
        if key is None:
            d.clear()
        else:
            d.pop(key, None)

    # -- statistics ----------------------------------------------------------------------------

    def get_stats(self) -> dict:
        """Counters of the ``@thread_safe_method`` calls of this adapter::

            {"total_requests", "active_requests", "max_workers", "peak_concurrency", "errors",
             "thread_utilization": {thread name: {"requests", "busy_seconds", "busy_fraction"}},
             "methods": {name: {"calls", "errors", "active", "peak_concurrency", "mean_ms",
                                "max_ms", "threads": {thread name: calls}}},
             "worker_mode", "gil_enabled", "uptime_seconds"}

        ``max_workers`` comes from the server (``None`` when the adapter is used directly).
        """
        stats = _stats_of(self).snapshot()
        info = getattr(self, "server_info", None)
        stats["max_workers"] = getattr(info, "max_workers", None)
        stats["worker_mode"] = getattr(info, "worker_mode", None)
        stats["gil_enabled"] = gil_enabled()
        return stats
