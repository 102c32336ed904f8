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
import logging
import threading
import time
from typing import Any, Callable, Optional

from snakepit_bridge import thread_safety_checker as _tsc
from snakepit_bridge.adapter import BaseAdapter, tool

__all__ = [
    "ThreadSafeAdapter",
    "thread_safe_method",
    "tool",
    "LockTimeoutError",
    "UnsafeAdapterError",
    "is_declared_thread_safe",
    "require_thread_safe_declaration",
]

logger = logging.getLogger(__name__)

_perf = time.perf_counter
_get_ident = threading.get_ident
_current_thread = threading.current_thread


class LockTimeoutError(TimeoutError):
    """``acquire_lock(timeout=...)`` could not take the adapter lock in time."""


class UnsafeAdapterError(RuntimeError):
    """The threaded server was asked to run an adapter that does not declare ``__thread_safe__``."""


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_declared_thread_safe(adapter_cls: type) -> bool:
    """True when the class (or a user base class) sets ``__thread_safe__ = True``."""
    return getattr(adapter_cls, "__thread_safe__", False) is True


def require_thread_safe_declaration(adapter_cls: type, *, allow_unsafe: bool = False,
                                    log: Optional[logging.Logger] = None) -> bool:
    """The threaded server's gate. Returns True when declared; raises :class:`UnsafeAdapterError`
    (naming the class and the fix) when not, unless ``allow_unsafe`` (``--allow-unsafe-adapter``),
    which logs a warning and returns False."""
    if is_declared_thread_safe(adapter_cls):
        return True
    path = _class_path(adapter_cls)
    fix = (f"Fix: make its tools safe to run in several threads at once and add "
           f"`__thread_safe__ = True` to class {adapter_cls.__qualname__}; or serve it with "
           f"grpc_server_process.py; or pass --allow-unsafe-adapter to run it threaded anyway.")
    if not allow_unsafe:
        raise UnsafeAdapterError(
            f"Adapter {path} does not declare thread safety (__thread_safe__ = True), so the "
            f"threaded server refuses to run it. {fix}")
    (log or logger).warning(
        "⚠️  Adapter %s does not declare thread safety (__thread_safe__ = True); running it in the "
        "threaded server anyway because of --allow-unsafe-adapter. Its tools may be called from "
        "several threads at once.", path)
    return False


# ---------------------------------------------------------------------------------------------
# Call statistics
# ---------------------------------------------------------------------------------------------

class _MethodStats:
    __slots__ = ("calls", "errors", "total_s", "max_s", "peak", "inside", "threads")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self.peak = 0            # most distinct threads inside the method at the same time
        self.inside: dict[int, int] = {}   # thread ident -> nesting depth, for threads inside now
        self.threads: dict[str, int] = {}  # thread name -> calls


class _CallStats:
    """Counters of one adapter instance. One plain lock, held for a few dict updates per call."""

    __slots__ = ("lock", "started", "total", "active", "peak", "errors", "methods", "depth",
                 "threads")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.total = 0            # requests: outermost tracked calls of a thread
        self.active = 0
        self.peak = 0
        self.errors = 0
        self.methods: dict[str, _MethodStats] = {}
        self.depth: dict[int, int] = {}    # thread ident -> nesting depth of tracked calls
        self.threads: dict[str, list] = {}  # thread name -> [requests, busy seconds]

    def enter(self, name: str, tid: int) -> None:
        with self.lock:
            m = self.methods.get(name)
            if m is None:
                m = self.methods[name] = _MethodStats()
            m.calls += 1
            inside = m.inside
            inside[tid] = inside.get(tid, 0) + 1
            if len(inside) > m.peak:
                m.peak = len(inside)
            d = self.depth.get(tid, 0)
            self.depth[tid] = d + 1
            if d == 0:
                self.total += 1
                self.active += 1
                if self.active > self.peak:
                    self.peak = self.active

    def exit(self, name: str, tid: int, elapsed: float, failed: bool) -> None:
        tname = _current_thread().name
        with self.lock:
            m = self.methods[name]
            m.total_s += elapsed
            if elapsed > m.max_s:
                m.max_s = elapsed
            m.threads[tname] = m.threads.get(tname, 0) + 1
            inside = m.inside
            n = inside[tid] - 1
            if n:
                inside[tid] = n
            else:
                del inside[tid]
            if failed:
                m.errors += 1
            d = self.depth[tid] - 1
            if d:
                self.depth[tid] = d
            else:
                del self.depth[tid]
                self.active -= 1
                if failed:
                    self.errors += 1
                t = self.threads.get(tname)
                if t is None:
                    self.threads[tname] = [1, elapsed]
                else:
                    t[0] += 1
                    t[1] += elapsed

    def snapshot(self) -> dict:
        with self.lock:
            uptime = max(time.time() - self.started, 1e-9)
            methods = {
                name: {
                    "calls": m.calls,
                    "errors": m.errors,
                    "active": sum(m.inside.values()),
                    "peak_concurrency": m.peak,
                    "mean_ms": (m.total_s / m.calls * 1000.0) if m.calls else 0.0,
                    "max_ms": m.max_s * 1000.0,
                    "threads": dict(m.threads),
                }
                for name, m in self.methods.items()
            }
            threads = {
                tname: {"requests": n, "busy_seconds": busy, "busy_fraction": busy / uptime}
                for tname, (n, busy) in self.threads.items()
            }
            return {
                "total_requests": self.total,
                "active_requests": self.active,
                "peak_concurrency": self.peak,
                "errors": self.errors,
                "thread_utilization": threads,
                "methods": methods,
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
            tid = _get_ident()
            checker = _tsc._ACTIVE
            token = checker._method_enter(self, name) if checker is not None else None
            stats.enter(name, tid)
            t0 = _perf()
            failed = True
            try:
                result = yield from fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                stats.exit(name, tid, _perf() - t0, failed)
                if token is not None:
                    checker._method_exit(token)
        wrapper = gen_wrapper
    elif inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(self, *args, **kwargs):
            stats = _stats_of(self)
            tid = _get_ident()
            checker = _tsc._ACTIVE
            token = checker._method_enter(self, name) if checker is not None else None
            stats.enter(name, tid)
            t0 = _perf()
            failed = True
            try:
                result = await fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                stats.exit(name, tid, _perf() - t0, failed)
                if token is not None:
                    checker._method_exit(token)
        wrapper = async_wrapper
    else:
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            try:
                stats = self._sp_stats
            except AttributeError:
                stats = _stats_of(self)
            tid = _get_ident()
            checker = _tsc._ACTIVE
            token = checker._method_enter(self, name) if checker is not None else None
            stats.enter(name, tid)
            t0 = _perf()
            failed = True
            try:
                result = fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                stats.exit(name, tid, _perf() - t0, failed)
                if token is not None:
                    checker._method_exit(token)

    wrapper.__snakepit_thread_safe__ = True
    return wrapper


# ---------------------------------------------------------------------------------------------
# The adapter lock
# ---------------------------------------------------------------------------------------------

class _LockContext:
    """What ``acquire_lock()`` returns: ``with adapter.acquire_lock(timeout=2.0): ...``."""

    __slots__ = ("_adapter", "_lock", "_timeout", "_noted")

    def __init__(self, adapter: "ThreadSafeAdapter", lock, timeout: Optional[float]) -> None:
        self._adapter = adapter
        self._lock = lock
        self._timeout = timeout
        self._noted = False

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
        if _tsc._ACTIVE is not None:
            _tsc._lock_acquired(id(lock))
            self._noted = True
        return lock

    def __exit__(self, exc_type, exc, tb):
        if self._noted:
            self._noted = False
            _tsc._lock_released(id(self._lock))
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

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_sp_lock", threading.RLock())
        object.__setattr__(self, "_sp_lock_owner", None)
        object.__setattr__(self, "_sp_lock_owner_ident", None)
        object.__setattr__(self, "_sp_lock_depth_of_owner", 0)
        object.__setattr__(self, "_sp_tls", threading.local())
        object.__setattr__(self, "_sp_stats", _CallStats())
        checker = _tsc._ACTIVE
        if checker is not None:
            # Everything the constructing thread does until the adapter starts serving (a call of a
            # tracked method, another thread touching it, or the server's checker.attach()) is
            # initialisation, not shared access.
            checker._register(self)

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
        stats["gil_enabled"] = _tsc.gil_enabled()
        return stats
