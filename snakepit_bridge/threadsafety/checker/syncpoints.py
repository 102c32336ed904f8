"""Happens-before edges from the standard synchronisation primitives, patched in while a checker
is enabled and restored when the last one closes.

=========================================  ==============================  ===========================
primitive                                  release (publishes the clock)   acquire (takes it)
=========================================  ==============================  ===========================
``queue.Queue`` (and Lifo/Priority)        ``put``; ``task_done``          ``get`` that returned;
                                                                           ``join``
``threading.Event``                        ``set``                         ``wait`` that returned True
``threading.Thread``                       ``start`` (into the new thread) the thread's start; ``join``
                                           the thread's end                of an ended thread
``threading.Condition``                    ``notify``/``notify_all``       ``wait`` / ``wait_for``
``threading.Barrier``                      ``wait`` (arriving)             ``wait`` (leaving)
``threading.Semaphore`` (and Bounded)      ``release``                     ``acquire`` that succeeded
``ThreadPoolExecutor.submit`` / Future     ``submit`` (into the call);     the call's start;
                                           ``set_result``/``set_exception``  ``result``/``exception``
=========================================  ==============================  ===========================

Edges count only for synchronisation the adapter's own code does (the nearest caller outside
``threading``/``queue``/``concurrent.futures`` is not the server, gRPC or asyncio): the server's
own hand-offs (its executor, its event loop) order calls by accident of scheduling, not by the
adapter's design, and counting them would hide races that another schedule shows.
"""
from __future__ import annotations

import concurrent.futures
import queue
import sys
import threading
import types
from typing import Any, Callable, Optional

from . import clocks

_getframe = sys._getframe

# modules whose frames are walked through to find who asked for the synchronisation
_SYNC_MODULES = frozenset({"threading", "queue", "concurrent.futures._base", "concurrent.futures.thread",
                           __name__})
# ... and callers whose synchronisation is infrastructure, not the adapter's
_INFRA_ROOTS = frozenset({"asyncio", "concurrent", "grpc", "grpclib", "h2", "hpack", "selectors",
                          "socketserver", "logging"})
_CHECKER_PACKAGE = __name__.rpartition(".")[0].rpartition(".")[0]   # snakepit_bridge.threadsafety


def _adapter_caller() -> bool:
    """Is the nearest frame outside the synchronisation modules adapter (user) code?"""
    f: Optional[types.FrameType] = _getframe(2)
    mod = ""
    while f is not None:
        mod = f.f_globals.get("__name__", "") or ""
        if mod not in _SYNC_MODULES:
            break
        f = f.f_back
    if f is None:
        return False
    if mod.partition(".")[0] in _INFRA_ROOTS or mod.startswith(_CHECKER_PACKAGE):
        return False
    if mod.startswith("snakepit_bridge.") and not mod.startswith("snakepit_bridge.adapters"):
        return False     # the server, its transports and base classes
    return True


def _clock_of(obj: Any) -> clocks.VectorClock:
    c = obj.__dict__.get("_sp_hb_vc")
    if c is None:
        c = obj.__dict__.setdefault("_sp_hb_vc", {})
    return c


_originals: list[tuple[type, str, Any]] = []
_users = [0]
_patch_lock = threading.Lock()


def _patch(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = cls.__dict__[name]
    wrapper = make(original)
    wrapper.__name__ = name
    wrapper.__qualname__ = f"{cls.__qualname__}.{name}"
    wrapper.__doc__ = original.__doc__
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    _originals.append((cls, name, original))
    setattr(cls, name, wrapper)


def _releasing(original):
    def wrapper(self, *args, **kwargs):
        if _adapter_caller():
            clocks.release_into(_clock_of(self))
        return original(self, *args, **kwargs)
    return wrapper


def _acquiring(original, succeeded: Callable[[Any], bool] = lambda r: True):
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if succeeded(result) and _adapter_caller():
            c = self.__dict__.get("_sp_hb_vc")
            if c:
                clocks.acquire_from(c)
        return result
    return wrapper


def _barrier_wait(original):
    def wrapper(self, *args, **kwargs):
        adapter = _adapter_caller()
        if adapter:
            clocks.release_into(_clock_of(self))
        result = original(self, *args, **kwargs)
        if adapter:
            clocks.acquire_from(_clock_of(self))
        return result
    return wrapper


def _thread_start(original):
    def wrapper(self, *args, **kwargs):
        if _adapter_caller() and "_sp_hb_start" not in self.__dict__:
            self._sp_hb_start = clocks.snapshot_release()
            self._sp_hb_end = {}
            run = self.run

            def run_with_clock():
                clocks.acquire_from(self._sp_hb_start)
                try:
                    run()
                finally:
                    clocks.release_into(self._sp_hb_end)

            self.run = run_with_clock
        return original(self, *args, **kwargs)
    return wrapper


def _thread_join(original):
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        end = self.__dict__.get("_sp_hb_end")
        if end is not None and not self.is_alive():
            clocks.acquire_from(end)
        return result
    return wrapper


def _future_set(original):
    def wrapper(self, *args, **kwargs):
        c = self.__dict__.get("_sp_hb_vc")
        if c is not None:          # a future the adapter submitted (or created)
            clocks.release_into(c)
        return original(self, *args, **kwargs)
    return wrapper


def _future_get(original):
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        c = self.__dict__.get("_sp_hb_vc")
        if c:
            clocks.acquire_from(c)
        return result
    return wrapper


def _submit(original):
    def wrapper(self, fn, /, *args, **kwargs):
        if not _adapter_caller():
            return original(self, fn, *args, **kwargs)
        start = clocks.snapshot_release()
        end: clocks.VectorClock = {}     # made before the call can run (and finish) in the pool

        def call_with_clock(*a, **k):
            clocks.acquire_from(start)
            try:
                return fn(*a, **k)
            finally:
                clocks.release_into(end)

        future = original(self, call_with_clock, *args, **kwargs)
        future.__dict__.setdefault("_sp_hb_vc", end)
        return future
    return wrapper


def _install() -> None:
    _patch(queue.Queue, "put", _releasing)
    _patch(queue.Queue, "get", _acquiring)
    _patch(queue.Queue, "task_done", _releasing)
    _patch(queue.Queue, "join", _acquiring)
    _patch(threading.Event, "set", _releasing)
    _patch(threading.Event, "wait", lambda o: _acquiring(o, bool))
    _patch(threading.Condition, "notify", _releasing)
    _patch(threading.Condition, "notify_all", _releasing)
    _patch(threading.Condition, "wait", lambda o: _acquiring(o, bool))        # not on a timeout
    _patch(threading.Condition, "wait_for", lambda o: _acquiring(o, bool))
    _patch(threading.Semaphore, "release", _releasing)
    _patch(threading.Semaphore, "acquire", lambda o: _acquiring(o, bool))
    _patch(threading.Semaphore, "__enter__", lambda o: _acquiring(o, bool))   # (= acquire)
    if "release" in threading.BoundedSemaphore.__dict__:                      # its own release
        _patch(threading.BoundedSemaphore, "release", _releasing)
    _patch(threading.Barrier, "wait", _barrier_wait)
    _patch(threading.Thread, "start", _thread_start)
    _patch(threading.Thread, "join", _thread_join)
    _patch(concurrent.futures.Future, "set_result", _future_set)
    _patch(concurrent.futures.Future, "set_exception", _future_set)
    _patch(concurrent.futures.Future, "result", _future_get)
    _patch(concurrent.futures.Future, "exception", _future_get)
    _patch(concurrent.futures.ThreadPoolExecutor, "submit", _submit)


def _uninstall() -> None:
    while _originals:
        cls, name, original = _originals.pop()
        setattr(cls, name, original)
    clocks.forget_locks()


def enable() -> None:
    """A checker was enabled: patch the primitives (once, however many checkers are enabled)."""
    with _patch_lock:
        _users[0] += 1
        if _users[0] == 1:
            _install()


def disable() -> None:
    """A checker closed: restore the primitives when it was the last."""
    with _patch_lock:
        if _users[0] == 0:
            return
        _users[0] -= 1
        if _users[0] == 0:
            _uninstall()


def installed() -> bool:
    return bool(_originals)
