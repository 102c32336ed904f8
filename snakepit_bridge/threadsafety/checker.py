"""Runtime race finder for adapters served by several threads.

    from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker
    checker = ThreadSafetyChecker(enabled=True, strict_mode=False)   # becomes the active checker
    ... adapters are created and called from many threads ...
    report = checker.get_report()

What it finds (each finding is logged once, when found, with the ``THREAD SAFETY:`` prefix):

* **Unprotected shared state** (the lockset discipline of Eraser, Savage et al., 1997). Every read
  and write of an adapter instance attribute is recorded with the thread and the set of the
  adapter's locks that thread holds: ``self.x`` reads, ``self.x = ...`` / ``self.x += 1`` writes and,
  for a list, dict or set held in an attribute, reads and in-place changes of its contents
  (``self.results.append(...)``, ``self.cache[k] = v``). An attribute that one thread writes and
  another thread reads or writes with no lock in common is reported once, with its methods,
  threads and the file:line of the accesses. State set before serving (``__init__``/``setup()``),
  read-only state and thread-local state are never reported.
* **Unsafe libraries**: a pandas, matplotlib or sqlite3 object held by the adapter, or pandas /
  ``matplotlib.pyplot`` module functions, used from more than one thread with no lock in common.
* **Undeclared safety**: an adapter class without ``__thread_safe__ = True``.
* **Real overlap**: per tracked method, the most threads that were inside it at the same time.

The adapter's locks are the ones reached through the adapter: ``self.acquire_lock()`` of a
:class:`~snakepit_bridge.base_adapter_threaded.ThreadSafeAdapter`, and ``threading.Lock``/``RLock``/
``Condition`` objects read from its attributes (``with self._lock:``).

In strict mode a finding raises :class:`ThreadSafetyViolation` in the thread whose access completed
it, inside the call that made it; the server turns that into an error for that one call. Each
finding is raised once, like it is logged once.

What counts as "before serving": everything before ``attach(adapter)`` (the server calls it after
``setup()``); for a ThreadSafeAdapter built while a checker is active, whatever the thread that built
it does outside tracked methods (its set-up, and a test's inspection afterwards). Serving starts with
the first ``@thread_safe_method`` call or the first access from another thread.

A class may list attributes whose races are deliberate (last-writer-wins bookkeeping) in
``__thread_safety_ignore__ = ("name", ...)``.

How: tracking an instance swaps its class for a generated subclass (same name) whose
``__getattribute__``/``__setattr__`` record accesses, and lists/dicts/sets assigned to its attributes
are stored as recording subclasses of list/dict/set (only when nothing else refers to the same
object, so aliasing never changes). All of this happens only while a checker is enabled.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time
import types
from typing import Any, Optional

__all__ = ["ThreadSafetyChecker", "ThreadSafetyViolation", "get_active_checker", "gil_enabled",
           "free_threaded_build"]

from .declaration import UNDECLARED_ADAPTER_ADVICE, is_declared_thread_safe, undeclared_adapter_message
from .interpreter import free_threaded_build, gil_enabled  # re-exported: part of this module's API

logger = logging.getLogger("snakepit_bridge.thread_safety")

_ACTIVE: Optional["ThreadSafetyChecker"] = None

_getframe = sys._getframe
_obj_getattr = object.__getattribute__
_EMPTY: frozenset = frozenset()

_STATE_KEY = "_sp_tsc"
_DETACHED_KEY = "_sp_tsc_detached"


def get_active_checker() -> Optional["ThreadSafetyChecker"]:
    return _ACTIVE


class ThreadSafetyViolation(RuntimeError):
    """Raised in strict mode, in the thread whose call completed a finding."""

    def __init__(self, finding: dict) -> None:
        super().__init__(finding.get("message", "thread safety violation"))
        self.finding = finding


# ---------------------------------------------------------------------------------------------
# Per-thread lockset
# ---------------------------------------------------------------------------------------------

_tls = threading.local()


_token_lock = threading.Lock()
_token_next = [0]


def _thread_token() -> int:
    """A number for the calling thread that is never reused (thread idents are, once a thread
    ends, and then two short-lived threads would look like one)."""
    d = _tls.__dict__
    t = d.get("token")
    if t is None:
        with _token_lock:
            _token_next[0] += 1
            t = d["token"] = _token_next[0]
    return t


def _lockset() -> frozenset:
    try:
        return _tls.lockset
    except AttributeError:
        return _EMPTY


def _lock_acquired(lock_id: int) -> None:
    d = _tls.__dict__
    held = d.get("held")
    if held is None:
        held = d["held"] = {}
    n = held.get(lock_id, 0)
    held[lock_id] = n + 1
    if n == 0:
        d["lockset"] = frozenset(held)


def _lock_released(lock_id: int) -> None:
    d = _tls.__dict__
    held = d.get("held")
    if not held or lock_id not in held:
        return
    n = held[lock_id] - 1
    if n:
        held[lock_id] = n
    else:
        del held[lock_id]
        d["lockset"] = frozenset(held)


def _current_tool() -> Optional[str]:
    tools = _tls.__dict__.get("tools")
    return tools[-1] if tools else None


class _TrackedLock:
    """Stands in for a lock read from a tracked adapter's attribute, so holding it is recorded."""

    __slots__ = ("_sp_lock", "_sp_id")

    def __init__(self, lock, lock_id: int) -> None:
        self._sp_lock = lock
        self._sp_id = lock_id

    def acquire(self, *args, **kwargs):
        ok = self._sp_lock.acquire(*args, **kwargs)
        if ok:
            _lock_acquired(self._sp_id)
        return ok

    def release(self):
        _lock_released(self._sp_id)
        return self._sp_lock.release()

    def __enter__(self):
        r = self._sp_lock.__enter__()
        _lock_acquired(self._sp_id)
        return r

    def __exit__(self, *exc):
        _lock_released(self._sp_id)
        return self._sp_lock.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._sp_lock, name)

    def __repr__(self) -> str:
        return repr(self._sp_lock)


_LOCK_TYPES: frozenset[type] = frozenset(
    {type(threading.Lock()), type(threading.RLock()), threading.Condition}
    | ({threading._PyRLock} if hasattr(threading, "_PyRLock") else set()))


def _lock_identity(lock) -> int:
    if isinstance(lock, threading.Condition):
        return id(getattr(lock, "_lock", lock))
    return id(lock)


# ---------------------------------------------------------------------------------------------
# Recording containers
# ---------------------------------------------------------------------------------------------

def _touch(container, write: bool) -> None:
    owner = container._sp_owner
    if owner is None:
        return
    st, attr = owner
    if st.detached:
        return
    if _thread_token() == st.creator and not _tls.__dict__.get("tools"):
        return
    if not st.active:
        st.checker._activate(st)
    # frame 0: _touch, 1: the container method, 2: the code that called it
    st.checker._record(st, attr, "contents", write, _getframe(2))


def _make_recording_type(base: type, writes: tuple, reads: tuple) -> type:
    ns: dict[str, Any] = {"__slots__": ("_sp_owner",)}

    def make(name: str, write: bool):
        original = getattr(base, name)

        def method(self, *args, **kwargs):
            _touch(self, write)
            return original(self, *args, **kwargs)

        method.__name__ = name
        method.__qualname__ = f"Recording{base.__name__.title()}.{name}"
        return method

    for n in writes:
        if hasattr(base, n):
            ns[n] = make(n, True)
    for n in reads:
        if hasattr(base, n):
            ns[n] = make(n, False)

    def __reduce_ex__(self, protocol):
        # copies and pickles are plain containers
        return (base, (base(self),))

    ns["__reduce_ex__"] = __reduce_ex__
    ns["__module__"] = __name__
    return type(f"Recording{base.__name__.title()}", (base,), ns)


_RecordingList = _make_recording_type(
    list,
    ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "__setitem__",
     "__delitem__", "__iadd__", "__imul__"),
    ("__getitem__", "__iter__", "__len__", "__contains__", "index", "count", "copy",
     "__reversed__"),
)
_RecordingDict = _make_recording_type(
    dict,
    ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault", "__ior__"),
    ("__getitem__", "get", "__contains__", "__iter__", "__len__", "keys", "values", "items",
     "copy"),
)
_RecordingSet = _make_recording_type(
    set,
    ("add", "discard", "remove", "pop", "clear", "update", "difference_update",
     "intersection_update", "symmetric_difference_update", "__ior__", "__iand__", "__isub__",
     "__ixor__"),
    ("__contains__", "__iter__", "__len__", "copy", "issubset", "issuperset", "isdisjoint",
     "union", "intersection", "difference", "symmetric_difference"),
)
_RECORDING = {list: _RecordingList, dict: _RecordingDict, set: _RecordingSet}
_RECORDING_TYPES = (_RecordingList, _RecordingDict, _RecordingSet)


def _wrap_container(value, st, attr):
    w = _RECORDING[type(value)](value)
    w._sp_owner = (st, attr)
    return w


# sys.getrefcount of a value seen inside the tracking __setattr__ when nothing but the assignment
# refers to it; measured once below (it depends on the interpreter), -1 = never wrap on assignment.
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


def _is_internal(name: str) -> bool:
    return name[:1] == "_" and (name[:2] == "__" or name[:4] == "_sp_")


def _tracked_class(cls: type) -> type:
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

        def __getattribute__(self, name):
            value = orig_getattribute(self, name)
            if name[:1] == "_" and (name[:2] == "__" or name[:4] == "_sp_"):
                return value
            d = _obj_getattr(self, "__dict__")
            st = d.get(_STATE_KEY)
            if st is None or st.detached:
                return value
            if type(value) in _LOCK_TYPES:
                return st.lock_wrapper(value)
            if name not in d and not is_class_data(name):
                return value
            if name in st.ignored:
                return value
            if _thread_token() == st.creator and not _tls.__dict__.get("tools"):
                return value      # the thread that built it, outside tools: set-up/inspection
            if not st.active:
                st.checker._activate(st)
            checker = st.checker
            frame = _getframe(1)
            checker._record(st, name, "binding", False, frame)
            lib = _unsafe_library_of(value)
            if lib is not None:
                checker._record_library_object(st, name, value, lib, frame)
            return value

        def __setattr__(self, name, value):
            if name[:1] == "_" and (name[:2] == "__" or name[:4] == "_sp_"):
                return orig_setattr(self, name, value)
            d = _obj_getattr(self, "__dict__")
            st = d.get(_STATE_KEY)
            if st is None or st.detached or name in st.ignored:
                return orig_setattr(self, name, value)
            if type(value) in _RECORDING and sys.getrefcount(value) <= _FRESH_REFCOUNT:
                value = _wrap_container(value, st, name)
            if _thread_token() != st.creator or _tls.__dict__.get("tools"):
                if not st.active:
                    st.checker._activate(st)
                st.checker._record(st, name, "binding", True, _getframe(1))
            return orig_setattr(self, name, value)

        def __delattr__(self, name):
            if not _is_internal(name):
                d = _obj_getattr(self, "__dict__")
                st = d.get(_STATE_KEY)
                if st is not None and not st.detached and name not in st.ignored and (
                        _thread_token() != st.creator or _tls.__dict__.get("tools")):
                    if not st.active:
                        st.checker._activate(st)
                    st.checker._record(st, name, "binding", True, _getframe(1))
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


class _InstanceState:
    __slots__ = ("checker", "obj_id", "cls", "cls_name", "creator", "active", "detached",
                 "locks", "ignored", "__weakref__")

    def __init__(self, checker, obj, cls) -> None:
        self.checker = checker
        self.obj_id = id(obj)
        self.cls = cls
        self.cls_name = cls.__qualname__
        self.creator = _thread_token()
        self.active = False
        self.detached = False
        self.locks: dict[int, _TrackedLock] = {}
        self.ignored = frozenset(getattr(cls, "__thread_safety_ignore__", ()) or ())

    def lock_wrapper(self, lock):
        key = id(lock)
        w = self.locks.get(key)
        if w is None or w._sp_lock is not lock:
            w = self.locks[key] = _TrackedLock(lock, _lock_identity(lock))
        return w


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


try:
    _FRESH_REFCOUNT = _calibrate_fresh_refcount()
except Exception:  # pragma: no cover - never let calibration break imports
    _FRESH_REFCOUNT = -1


# ---------------------------------------------------------------------------------------------
# Unsafe libraries
# ---------------------------------------------------------------------------------------------

_UNSAFE_LIBRARIES = {
    "pandas": "Pandas is not thread-safe: use locking (`with self.acquire_lock():`) or process mode.",
    "matplotlib": "Matplotlib is not thread-safe: use threading.local() for figures (one Figure per "
                  "thread, no pyplot state machine), locking, or process mode.",
    "sqlite3": "SQLite3 objects are not thread-safe: use a connection per thread "
               "(get_thread_local/set_thread_local), locking, or process mode.",
}
_UNSAFE_MODULES = {"pandas": "pandas", "matplotlib.pyplot": "matplotlib"}
# callers whose module-level use is the libraries' own business (and the import machinery's)
_LIBRARY_INTERNALS = frozenset({"pandas", "matplotlib", "mpl_toolkits", "importlib",
                                "_frozen_importlib", "_frozen_importlib_external", "numpy"})


def _unsafe_library_of(value) -> Optional[str]:
    mod = type(value).__module__
    if not mod:
        return None
    root = mod.partition(".")[0]
    if root in _UNSAFE_LIBRARIES:
        return root
    if root == "_sqlite3":
        return "sqlite3"
    return None


class _RecordingModule(types.ModuleType):
    """Module class swapped onto pandas / matplotlib.pyplot while a checker is enabled."""

    def __getattribute__(self, name):
        value = types.ModuleType.__getattribute__(self, name)
        if name[:1] == "_":
            return value
        checker = _ACTIVE
        if checker is None:
            return value
        frame = _getframe(1)
        lib = _UNSAFE_MODULES.get(types.ModuleType.__getattribute__(self, "__name__"))
        caller = frame.f_globals.get("__name__", "") or ""
        if lib is None or caller.partition(".")[0] in _LIBRARY_INTERNALS or caller == __name__:
            return value
        if _current_tool() is None and threading.current_thread() is threading.main_thread():
            return value
        checker._record_library_module(types.ModuleType.__getattribute__(self, "__name__"), lib,
                                       name, frame)
        return value


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------

class _Access:
    __slots__ = ("tid", "thread", "write", "locks", "function", "method", "tool", "file", "line",
                 "part")

    def __init__(self, tid, write, locks, frame, part) -> None:
        self.tid = tid
        self.thread = threading.current_thread().name
        self.write = write
        self.locks = locks
        code = frame.f_code
        self.function = getattr(code, "co_qualname", code.co_name)
        self.method = code.co_name
        self.tool = _current_tool()
        self.file = code.co_filename
        self.line = frame.f_lineno
        self.part = part

    def as_dict(self, lock_names) -> dict:
        return {
            "thread": self.thread,
            "access": "write" if self.write else "read",
            "what": "attribute" if self.part == "binding" else "contents",
            "method": self.method,
            "function": self.function,
            "tool": self.tool,
            "location": f"{self.file}:{self.line}",
            "file": self.file,
            "line": self.line,
            "locks_held": sorted(lock_names.get(i, f"lock@{i:#x}") for i in self.locks),
        }


class _Overlap:
    """Per (class, method): who is inside now, and the most threads inside at the same time."""

    __slots__ = ("inside", "peak", "peak_threads", "calls", "names")

    def __init__(self) -> None:
        self.inside: set[int] = set()
        self.peak = 0
        self.peak_threads: list[str] = []
        self.calls: dict[int, int] = {}    # thread token -> calls (each thread writes its own)
        self.names: dict[int, str] = {}    # thread token -> thread name


class _Variable:
    __slots__ = ("summaries", "accesses")

    def __init__(self) -> None:
        self.summaries: dict[tuple, _Access] = {}   # (tid, write, lockset) -> first such access
        self.accesses: list[_Access] = []            # distinct (site, kind, thread), bounded


_MAX_ACCESSES_PER_VAR = 32
_MAX_SEEN = 200_000


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


class ThreadSafetyChecker:
    """See the module docstring. ``enabled=True`` makes this the active checker."""

    def __init__(self, enabled: bool = True, strict_mode: bool = False, *,
                 log: Optional[logging.Logger] = None) -> None:
        global _ACTIVE
        self.enabled = bool(enabled)
        self.strict_mode = bool(strict_mode)
        self.log = log or logger
        self._lock = threading.RLock()
        self._started = time.time()
        self._states: dict[int, _InstanceState] = {}
        self._objects: dict[int, Any] = {}           # keeps tracked instances comparable by id
        # access keys already judged; a dict, whose lookups take no lock on free-threaded builds
        self._seen: dict = {}
        self._vars: dict[tuple, _Variable] = {}
        self._reported: set = set()
        self._findings: list[dict] = []
        self._lock_names: dict[int, str] = {}
        self._methods: dict[tuple, _Overlap] = {}    # (class, method) -> overlap record
        self._module_count = -1
        self._libs: dict[tuple, dict] = {}           # (lib, object key) -> use record
        self._declarations: dict[str, bool] = {}
        self._instrumented: list[types.ModuleType] = []
        self._attach_count = 0
        if self.enabled:
            _ACTIVE = self
            self._instrument_modules()

    # -- life cycle -----------------------------------------------------------------------------

    def check_declaration(self, adapter_cls: type) -> bool:
        """Reports an ``undeclared_thread_safety`` finding (once per class) when ``adapter_cls``
        lacks ``__thread_safe__ = True``. Returns whether it is declared."""
        declared = is_declared_thread_safe(adapter_cls)
        original = getattr(adapter_cls, "__sp_tracked_original__", None) or adapter_cls
        path = f"{original.__module__}.{original.__qualname__}"
        if not self.enabled:
            return declared
        with self._lock:
            if path in self._declarations:
                return declared
            self._declarations[path] = declared
        if not declared:
            self._add_finding({
                "kind": "undeclared_thread_safety",
                "severity": "warning",
                "adapter": path,
                "message": undeclared_adapter_message(original),
                "advice": UNDECLARED_ADAPTER_ADVICE,
            }, raise_in_strict=False)
        return declared

    def attach(self, adapter: Any) -> None:
        """Start tracking ``adapter``: from now on it is serving. Idempotent."""
        if not self.enabled:
            return
        try:
            _obj_getattr(adapter, "__dict__").pop(_DETACHED_KEY, None)
        except AttributeError:
            pass
        st = self._register(adapter)
        if st is None:
            return
        with self._lock:
            if st.active:
                return
            # Containers assigned before serving with other references to them were left alone;
            # wrap those that only the instance refers to now (nothing runs concurrently yet).
            d = _obj_getattr(adapter, "__dict__")
            for name, value in list(d.items()):
                if type(value) in _RECORDING and not _is_internal(name) and \
                        name not in st.ignored:
                    refs = [r for r in gc.get_referrers(value) if r is not d]
                    if not refs:
                        d[name] = _wrap_container(value, st, name)
            self._activate(st)

    def detach(self, adapter: Any = None) -> None:
        """Stop tracking ``adapter`` (every tracked adapter when None); the report is kept."""
        with self._lock:
            ids = list(self._states) if adapter is None else [id(adapter)]
            for i in ids:
                st = self._states.pop(i, None)
                obj = self._objects.pop(i, None)
                if st is None:
                    continue
                st.detached = True
                st.active = False
                if obj is not None and type(obj) is not st.cls:
                    try:
                        d = _obj_getattr(obj, "__dict__")
                        d.pop(_STATE_KEY, None)
                        d[_DETACHED_KEY] = self      # no lazy re-attach by a later method call
                        obj.__class__ = st.cls
                    except TypeError:
                        pass

    def close(self) -> None:
        """Detach everything, restore instrumented modules and stop being the active checker."""
        global _ACTIVE
        self.detach()
        with self._lock:
            for mod in self._instrumented:
                try:
                    if type(mod) is _RecordingModule:
                        mod.__class__ = types.ModuleType  # type: ignore[assignment]
                except TypeError:
                    pass
            self._instrumented.clear()
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> "ThreadSafetyChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- registration ---------------------------------------------------------------------------

    def _register(self, obj: Any) -> Optional[_InstanceState]:
        if not self.enabled:
            return None
        try:
            d = _obj_getattr(obj, "__dict__")
        except AttributeError:
            return None
        st = d.get(_STATE_KEY)
        if st is not None and not st.detached:
            if st.checker is not self:
                old = st.checker
                with old._lock:
                    old._states.pop(st.obj_id, None)
                    old._objects.pop(st.obj_id, None)
                st.checker = self
                with self._lock:
                    self._states[st.obj_id] = st
                    self._objects[st.obj_id] = obj
            return st
        cls = type(obj)
        original = getattr(cls, "__sp_tracked_original__", None) or cls
        st = _InstanceState(self, obj, original)
        try:
            tracked = _tracked_class(original)
            d[_STATE_KEY] = st
            if type(obj) is not tracked:
                obj.__class__ = tracked
        except TypeError as exc:
            d.pop(_STATE_KEY, None)
            self.log.warning("THREAD SAFETY: cannot track attributes of %s (%s); only call "
                             "overlap is checked.", original.__qualname__, exc)
            return None
        with self._lock:
            self._states[st.obj_id] = st
            self._objects[st.obj_id] = obj
            self._attach_count += 1
        base_lock = d.get("_sp_lock")
        if base_lock is not None:
            self._lock_names[id(base_lock)] = f"{original.__qualname__}.acquire_lock()"
        for name, value in d.items():
            if type(value) in _LOCK_TYPES and not _is_internal(name):
                self._lock_names[_lock_identity(value)] = f"self.{name}"
        for klass in original.__mro__:
            for name, value in klass.__dict__.items():
                if type(value) in _LOCK_TYPES:
                    self._lock_names.setdefault(_lock_identity(value), f"self.{name}")
        self.check_declaration(original)
        return st

    def _activate(self, st: _InstanceState) -> None:
        if st.active:
            return
        with self._lock:
            st.active = True
        self._instrument_modules()

    def _instrument_modules(self) -> None:
        self._module_count = len(sys.modules)
        for modname in _UNSAFE_MODULES:
            mod = sys.modules.get(modname)
            if mod is not None and type(mod) is types.ModuleType:
                try:
                    mod.__class__ = _RecordingModule
                except TypeError:
                    continue
                with self._lock:
                    self._instrumented.append(mod)

    # -- method overlap -------------------------------------------------------------------------

    def _method_enter(self, obj: Any, name: str):
        if not self.enabled:
            return None
        try:
            d = _obj_getattr(obj, "__dict__")
        except AttributeError:
            d = {}
        st = d.get(_STATE_KEY)
        if st is None or st.detached or st.checker is not self:
            if d.get(_DETACHED_KEY) is self:
                return None
            st = self._register(obj)
        if st is not None and not st.active:
            self._activate(st)
        cls_name = st.cls_name if st is not None else type(obj).__qualname__
        tl = _tls.__dict__
        tok = tl.get("token") or _thread_token()
        tools = tl.get("tools")
        if tools is None:
            tools = tl["tools"] = []
        tools.append(name)
        key = (cls_name, name)
        rec = self._methods.get(key)
        if rec is None:
            with self._lock:
                rec = self._methods.setdefault(key, _Overlap())
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
                self._new_overlap_peak(rec, name)
        if len(sys.modules) != self._module_count:
            self._instrument_modules()
        return (rec, tok, first)

    def _new_overlap_peak(self, rec: "_Overlap", name: str) -> None:
        with self._lock:
            inside = list(rec.inside)
            if len(inside) <= rec.peak:
                return
            newly_concurrent = rec.peak < 2 <= len(inside)
            rec.peak = len(inside)
            rec.peak_threads = sorted(rec.names.get(t, "?") for t in inside)
        if newly_concurrent:
            # the guide's wording; an observation, not a finding (overlap alone is no race)
            self.log.info("⚠️  THREAD SAFETY: Method '%s' accessed by %d different threads "
                          "concurrently.", name, 2)

    def _method_exit(self, token) -> None:
        if token is None:
            return
        rec, tok, first = token
        tools = _tls.__dict__.get("tools")
        if tools:
            tools.pop()
        if first:
            rec.inside.discard(tok)

    # -- recording ------------------------------------------------------------------------------

    def _record(self, st: _InstanceState, attr: str, part: str, write: bool, frame) -> None:
        tid = _thread_token()
        locks = _lockset()
        code = frame.f_code
        key = (st.obj_id, attr, part, tid, write, locks, code, frame.f_lineno)
        seen = self._seen
        if key in seen:
            return
        finding = None
        with self._lock:
            if key in seen or st.detached:
                return
            if len(seen) < _MAX_SEEN:
                seen[key] = None
            acc = _Access(tid, write, locks, frame, part)
            vkey = (st.obj_id, attr, part)
            var = self._vars.get(vkey)
            if var is None:
                var = self._vars[vkey] = _Variable()
            if len(var.accesses) < _MAX_ACCESSES_PER_VAR:
                var.accesses.append(acc)
            skey = (tid, write, locks)
            if skey not in var.summaries:
                if (st.obj_id, attr) not in self._reported:
                    for other in var.summaries.values():
                        if other.tid != tid and (write or other.write) and \
                                not (locks & other.locks):
                            self._reported.add((st.obj_id, attr))
                            finding = self._race_finding(st, attr, part, other, acc)
                            break
                var.summaries[skey] = acc
        if finding is not None:
            self._add_finding(finding, raise_in_strict=True)

    def _race_finding(self, st, attr, part, first: _Access, second: _Access) -> dict:
        names = self._lock_names
        related = [a for p in ("binding", "contents")
                   for a in (self._vars.get((st.obj_id, attr, p)) or _Variable()).accesses]
        methods = sorted({a.tool or a.method for a in related} | {first.tool or first.method,
                                                                  second.tool or second.method})
        threads = sorted({a.thread for a in related} | {first.thread, second.thread})

        def describe(a: _Access) -> str:
            what = "written" if a.write else "read"
            if a.part == "contents":
                what = "changed in place" if a.write else "read (contents)"
            held = ", ".join(sorted(names.get(i, "a lock") for i in a.locks)) or "no lock"
            return (f"{what} by thread '{a.thread}' in {a.tool or a.method} "
                    f"({_short(a.file)}:{a.line}, holding {held})")

        concurrent = [m for m in methods
                      if getattr(self._methods.get((st.cls_name, m)), "peak", 0) >= 2]
        overlap = ""
        if concurrent:
            peak = max(self._methods[(st.cls_name, m)].peak for m in concurrent)
            overlap = (f" Method '{concurrent[0]}' accessed by {peak} different threads "
                       f"concurrently.")
        message = (f"THREAD SAFETY: Unprotected shared state: attribute '{attr}' of "
                   f"{st.cls_name} is {describe(first)} and {describe(second)}, with no lock "
                   f"in common.{overlap} Ensure proper locking for shared mutable state: wrap "
                   f"every access in `with self.acquire_lock():`, or keep it per thread with "
                   f"get_thread_local()/set_thread_local().")
        return {
            "kind": "unprotected_shared_state",
            "severity": "error" if self.strict_mode else "warning",
            "adapter": f"{st.cls.__module__}.{st.cls.__qualname__}",
            "attribute": attr,
            "methods": methods,
            "threads": threads,
            "conflict": [first.as_dict(names), second.as_dict(names)],
            "accesses": [a.as_dict(names) for a in related],
            "message": message,
            "advice": "Protect every access with `with self.acquire_lock():` (the same lock for "
                      "all readers and writers), or make the state thread-local.",
        }

    def _record_library_object(self, st, attr: str, value, lib: str, frame) -> None:
        obj_desc = f"{type(value).__module__.lstrip('_')}.{type(value).__qualname__}"
        self._record_library_use(("object", st.obj_id, attr, id(value)), lib,
                                 f"{obj_desc} held in attribute '{attr}' of {st.cls_name}",
                                 frame, attribute=attr, adapter=st.cls_name)

    def _record_library_module(self, modname: str, lib: str, name: str, frame) -> None:
        self._record_library_use(("module", modname), lib,
                                 f"module-level {modname} state ({modname}.{name} and others)",
                                 frame)

    def _record_library_use(self, key: tuple, lib: str, what: str, frame, **extra) -> None:
        tid = _thread_token()
        locks = _lockset()
        fast = (key, tid, locks, frame.f_code, frame.f_lineno)
        if fast in self._seen:
            return
        finding = None
        with self._lock:
            if fast in self._seen:
                return
            if len(self._seen) < _MAX_SEEN:
                self._seen[fast] = None
            rec = self._libs.get(key)
            if rec is None:
                rec = self._libs[key] = {"summaries": {}, "accesses": [], "reported": False}
            acc = _Access(tid, True, locks, frame, "library")
            if len(rec["accesses"]) < _MAX_ACCESSES_PER_VAR:
                rec["accesses"].append(acc)
            skey = (tid, locks)
            if skey not in rec["summaries"]:
                if not rec["reported"]:
                    for other in rec["summaries"].values():
                        if other.tid != tid and not (locks & other.locks):
                            rec["reported"] = True
                            finding = self._library_finding(lib, what, other, acc, rec, extra)
                            break
                rec["summaries"][skey] = acc
        if finding is not None:
            self._add_finding(finding, raise_in_strict=True)

    def _library_finding(self, lib, what, first, second, rec, extra) -> dict:
        names = self._lock_names
        tools = sorted({a.tool or a.method for a in rec["accesses"]} |
                       {first.tool or first.method, second.tool or second.method})
        threads = sorted({a.thread for a in rec["accesses"]} | {first.thread, second.thread})
        advice = _UNSAFE_LIBRARIES[lib]
        message = (f"THREAD SAFETY: Unsafe library '{lib}' detected: {what} is used by threads "
                   f"'{first.thread}' ({_short(first.file)}:{first.line}) and '{second.thread}' "
                   f"({_short(second.file)}:{second.line}) in tool "
                   f"{', '.join(repr(t) for t in tools)} with no lock in common. Use process "
                   f"mode or add explicit locking. {advice}")
        finding = {
            "kind": "unsafe_library",
            "severity": "error" if self.strict_mode else "warning",
            "library": lib,
            "object": what,
            "tools": tools,
            "tool": tools[0] if tools else None,
            "threads": threads,
            "accesses": [a.as_dict(names) for a in rec["accesses"]],
            "message": message,
            "advice": f"Use process mode or add explicit locking. {advice}",
        }
        finding.update(extra)
        return finding

    def _add_finding(self, finding: dict, *, raise_in_strict: bool) -> None:
        finding.setdefault("found_at_unix", time.time())
        with self._lock:
            self._findings.append(finding)
        msg = finding["message"]
        self.log.warning("%s%s", "" if msg.startswith("⚠️") else "⚠️  ", msg)
        if raise_in_strict and self.strict_mode:
            raise ThreadSafetyViolation(finding)

    # -- report ---------------------------------------------------------------------------------

    @property
    def findings(self) -> list[dict]:
        with self._lock:
            return list(self._findings)

    def get_report(self) -> dict:
        """A JSON-serialisable report: interpreter facts, findings, per-method overlap."""
        with self._lock:
            findings = [dict(f) for f in self._findings]
            methods = {}
            for (cls_name, name), rec in sorted(self._methods.items()):
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
            tracked = sorted({f"{st.cls.__module__}.{st.cls.__qualname__}"
                              for st in self._states.values()})
            variables = len(self._vars)
        kinds: dict[str, int] = {}
        for f in findings:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        return {
            "enabled": self.enabled,
            "strict_mode": self.strict_mode,
            "python_version": sys.version.split()[0],
            "implementation": sys.implementation.name,
            "gil_enabled": gil_enabled(),
            "free_threaded_build": free_threaded_build(),
            "started_unix": self._started,
            "generated_unix": time.time(),
            "tracked_adapters": tracked,
            "tracked_variables": variables,
            "declarations": dict(self._declarations),
            "summary": {"findings": len(findings), "by_kind": kinds},
            "findings": findings,
            "methods": methods,
            "concurrent_methods": sorted(k for k, v in methods.items() if v["concurrent"]),
        }

    def write_report(self, path: str) -> str:
        report = self.get_report()
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
        return path
