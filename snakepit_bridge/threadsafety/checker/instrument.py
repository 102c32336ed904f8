"""Instrumentation: making a tracked adapter's attribute accesses, container changes and lock holds
visible to the checker.

Tracking an instance swaps its class for a generated subclass (same name) whose
``__getattribute__``/``__setattr__``/``__delattr__`` report accesses; lists, dicts and sets assigned
to its attributes are stored as recording subclasses of list/dict/set (only when nothing else refers
to the same object, so aliasing never changes); locks read from its attributes come back wrapped, so
holding them enters the thread's lockset. What is reported goes to the instance's
:class:`InstanceState`'s checker, through :class:`AccessRecorder`.
"""
from __future__ import annotations

import sys
import threading
import types
from typing import Any, Optional, Protocol

from . import clocks
from .arrays import is_plain_ndarray, wrap_array, wrap_bytearray
from .containers import RECORDING, wrap_container
from .libraries import unsafe_library_of
from .lockset import BINDING, lock_acquired, lock_released, per_thread, thread_token

_getframe = sys._getframe
_obj_getattr = object.__getattribute__

STATE_KEY = "_sp_tsc"                 # instance __dict__ key of its InstanceState
DETACHED_KEY = "_sp_tsc_detached"     # ... of the checker that detached it (no lazy re-attach)


class AccessRecorder(Protocol):
    """What instrumented objects report to (the checker that tracks them)."""

    def activate(self, st: InstanceState) -> None:
        """The instance starts serving: from now on its accesses count."""

    def record_access(self, st: InstanceState, attr: str, part: tuple, write: bool,
                      frame: types.FrameType, commutes: bool = False) -> None:
        """An access of ``attr``: its binding (``lockset.BINDING``), its container's or array's
        contents (``("contents", path)``) or one element (``("item", path, key)``)."""

    def lock_named(self, lock: Any, name: str) -> None:
        """The lock ``lock`` was read from the attribute ``name``: name it so in findings."""

    def record_library_object(self, st: InstanceState, attr: str, value: Any, lib: str,
                              frame: types.FrameType) -> None:
        """``value``, an object of the unsafe library ``lib``, was read from ``attr``."""


def is_internal(name: str) -> bool:
    """Dunder names and this package's own ``_sp_`` attributes are never tracked."""
    return name[:1] == "_" and (name[:2] == "__" or name[:4] == "_sp_")


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------

class TrackedLock:
    """Stands in for a lock read from a tracked adapter's attribute, so holding it is recorded."""

    __slots__ = ("_sp_lock", "_sp_id")

    def __init__(self, lock, lock_id: int) -> None:
        self._sp_lock = lock
        self._sp_id = lock_id

    def acquire(self, *args, **kwargs):
        ok = self._sp_lock.acquire(*args, **kwargs)
        if ok:
            lock_acquired(self._sp_id)
            clocks.lock_acquire(self._sp_id)
        return ok

    def release(self):
        lock_released(self._sp_id)
        clocks.lock_release(self._sp_id)     # before the release: the next holder sees it
        return self._sp_lock.release()

    def __enter__(self):
        r = self._sp_lock.__enter__()
        lock_acquired(self._sp_id)
        clocks.lock_acquire(self._sp_id)
        return r

    def __exit__(self, *exc):
        lock_released(self._sp_id)
        clocks.lock_release(self._sp_id)
        return self._sp_lock.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._sp_lock, name)

    def __repr__(self) -> str:
        return repr(self._sp_lock)


LOCK_TYPES: frozenset[type] = frozenset(
    {type(threading.Lock()), type(threading.RLock()), threading.Condition}
    | ({threading._PyRLock} if hasattr(threading, "_PyRLock") else set()))


def lock_identity(lock) -> int:
    """The id a lock counts under in locksets (a Condition counts as the lock it wraps)."""
    if isinstance(lock, threading.Condition):
        return id(getattr(lock, "_lock", lock))
    return id(lock)


# ---------------------------------------------------------------------------------------------
# Tracked instances
# ---------------------------------------------------------------------------------------------

class InstanceState:
    """The checker's record of one tracked instance, kept in its ``__dict__`` under STATE_KEY."""

    __slots__ = ("checker", "obj_id", "cls", "cls_name", "creator", "active", "detached",
                 "locks", "ignored", "__weakref__")

    def __init__(self, checker: AccessRecorder, obj: Any, cls: type) -> None:
        self.checker = checker
        self.obj_id = id(obj)
        self.cls = cls
        self.cls_name = cls.__qualname__
        self.creator = thread_token()     # its accesses outside tools are set-up, not sharing
        self.active = False               # serving yet
        self.detached = False
        self.locks: dict[int, TrackedLock] = {}
        self.ignored = frozenset(getattr(cls, "__thread_safety_ignore__", ()) or ())

    def lock_wrapper(self, lock, name: str) -> TrackedLock:
        key = id(lock)
        w = self.locks.get(key)
        if w is None or w._sp_lock is not lock:
            w = self.locks[key] = TrackedLock(lock, lock_identity(lock))
            # named when first read: a subclass's locks are created after the base registered
            # the instance
            self.checker.lock_named(lock, name)
        return w


# ---------------------------------------------------------------------------------------------
# Stored values: containers and arrays (containers.py, arrays.py)
# ---------------------------------------------------------------------------------------------

def recording_value(value, st: InstanceState, attr: str, fresh: bool):
    """What to store for ``value`` assigned to ``attr``: a recording container/bytearray copy when
    ``fresh`` (nothing else refers to it), a recording view of an ndarray always (views share
    memory: aliasing is kept), else ``value`` itself."""
    t = type(value)
    if t in RECORDING:
        return wrap_container(value, st, attr) if fresh else value
    if t is bytearray:
        return wrap_bytearray(value, st, attr) if fresh else value
    if is_plain_ndarray(value):
        return wrap_array(value, st, attr)
    return value


WRAPPABLE = frozenset(RECORDING) | {bytearray}


def _calibrate_fresh_refcount() -> int:
    """Measure what sys.getrefcount reports inside the tracking __setattr__ for a value nobody else
    holds, through both ``obj.x = []`` and ``setattr(obj, "x", [])``; check that an aliased value
    reads higher. Returns -1 (never wrap on assignment) when that cannot be told apart."""
    seen: list[int] = []

    class _Probe:
        def __setattr__(self, name, value):
            seen.append(sys.getrefcount(value))
            object.__setattr__(self, name, value)

    p = _Probe()
    p.a = []
    setattr(p, "b", [])
    p.c = {}
    fresh = min(seen)
    seen.clear()
    alias: list = []
    p.d = alias
    setattr(p, "e", alias)
    aliased = min(seen)
    del alias
    if aliased <= fresh or max(seen) < 0:
        return -1
    # the tracking __setattr__ calls sys.getrefcount the same way, one Python call deep
    return fresh


# sys.getrefcount of a value seen inside the tracking __setattr__ when nothing but the assignment
# refers to it (it depends on the interpreter); -1 = never wrap on assignment.
try:
    _FRESH_REFCOUNT = _calibrate_fresh_refcount()
except Exception:  # pragma: no cover - never let calibration break imports
    _FRESH_REFCOUNT = -1


# ---------------------------------------------------------------------------------------------
# Tracked classes
# ---------------------------------------------------------------------------------------------

_TRACKED_CLASSES: dict[type, type] = {}
_TRACKED_LOCK = threading.Lock()
_DATA_SKIP_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, property,
                    classmethod, staticmethod, type, types.MethodDescriptorType,
                    types.WrapperDescriptorType, types.GetSetDescriptorType,
                    types.MemberDescriptorType)


def original_class(cls: type) -> type:
    """The adapter's own class, for ``cls`` or the tracked subclass made of it."""
    return getattr(cls, "__sp_tracked_original__", None) or cls


def tracked_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose attribute access is recorded."""
    if getattr(cls, "__sp_tracked_original__", None) is not None:
        return cls
    with _TRACKED_LOCK:
        t = _TRACKED_CLASSES.get(cls)
        if t is not None:
            return t
        orig_getattribute = cls.__getattribute__
        orig_setattr = cls.__setattr__
        orig_delattr = cls.__delattr__
        class_kind: dict[str, bool] = {}   # name -> is it class-level data worth tracking

        def is_class_data(name: str) -> bool:
            r = class_kind.get(name)
            if r is None:
                r = False
                for klass in cls.__mro__:
                    if name in klass.__dict__:
                        v = klass.__dict__[name]
                        r = not isinstance(v, _DATA_SKIP_TYPES) and not hasattr(v, "__get__")
                        break
                class_kind[name] = r
            return r

        # The three below are the hot path while checking: is_internal() and the per-thread checks
        # are written out inline.
        def __getattribute__(self, name):
            value = orig_getattribute(self, name)
            if name[:1] == "_" and (name[:2] == "__" or name[:4] == "_sp_"):
                return value
            d = _obj_getattr(self, "__dict__")
            st = d.get(STATE_KEY)
            if st is None or st.detached:
                return value
            if type(value) in LOCK_TYPES:
                return st.lock_wrapper(value, name)
            if name not in d and not is_class_data(name):
                return value
            if name in st.ignored:
                return value
            if thread_token() == st.creator and not per_thread.__dict__.get("tools"):
                return value      # the thread that built it, outside tools: set-up/inspection
            if not st.active:
                st.checker.activate(st)
            checker = st.checker
            frame = _getframe(1)
            checker.record_access(st, name, BINDING, False, frame)
            lib = unsafe_library_of(value)
            if lib is not None:
                checker.record_library_object(st, name, value, lib, frame)
            return value

        def __setattr__(self, name, value):
            if name[:1] == "_" and (name[:2] == "__" or name[:4] == "_sp_"):
                return orig_setattr(self, name, value)
            d = _obj_getattr(self, "__dict__")
            st = d.get(STATE_KEY)
            if st is None or st.detached or name in st.ignored:
                return orig_setattr(self, name, value)
            if type(value) in WRAPPABLE:
                fresh = sys.getrefcount(value) <= _FRESH_REFCOUNT    # (before value is an arg)
                value = recording_value(value, st, name, fresh)
            elif is_plain_ndarray(value):
                value = wrap_array(value, st, name)
            if thread_token() != st.creator or per_thread.__dict__.get("tools"):
                if not st.active:
                    st.checker.activate(st)
                st.checker.record_access(st, name, BINDING, True, _getframe(1))
            return orig_setattr(self, name, value)

        def __delattr__(self, name):
            if not is_internal(name):
                d = _obj_getattr(self, "__dict__")
                st = d.get(STATE_KEY)
                if st is not None and not st.detached and name not in st.ignored and (
                        thread_token() != st.creator or per_thread.__dict__.get("tools")):
                    if not st.active:
                        st.checker.activate(st)
                    st.checker.record_access(st, name, BINDING, True, _getframe(1))
            return orig_delattr(self, name)

        ns = {
            "__getattribute__": __getattribute__,
            "__setattr__": __setattr__,
            "__delattr__": __delattr__,
            "__slots__": (),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__sp_tracked_original__": cls,
        }
        t = type(cls)(cls.__name__, (cls,), ns)
        _TRACKED_CLASSES[cls] = t
        return t


def instance_dict(obj: Any) -> Optional[dict]:
    """``obj.__dict__`` without going through a tracked ``__getattribute__``; None without one."""
    try:
        return _obj_getattr(obj, "__dict__")
    except AttributeError:
        return None
