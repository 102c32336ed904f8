"""Runtime race finder for adapters served by several threads.

    from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker
    checker = ThreadSafetyChecker(enabled=True, strict_mode=False)   # becomes the active checker
    ... adapters are created and called from many threads ...
    report = checker.get_report()

What it finds (each finding is logged once, when found, with the ``THREAD SAFETY:`` prefix):

* **Unprotected shared state**: two accesses of the same adapter state from different threads, at
  least one a write, that no happens-before edge orders *and* that hold no lock in common (the
  lockset discipline of Eraser, Savage et al., 1997, combined with vector clocks as in FastTrack
  and ThreadSanitizer v2; see ``clocks`` and ``syncpoints``). Edges come from the adapter's own
  lock hand-offs (release -> next acquire), ``queue.Queue`` put -> get, ``Event`` set -> wait,
  ``Thread`` start/join, ``Condition`` notify -> wait, ``Barrier``, ``Semaphore`` release ->
  acquire, and ``ThreadPoolExecutor.submit`` -> the call -> ``Future.result``. State is: every
  ``self.x`` binding; the contents of a list, dict or set held in an attribute, dicts per key and
  lists per index (``self.cache[k]``, ``self.slots[i]``: distinct keys do not race, colliding keys
  do), and the containers inside them to a bounded depth (``self.table["rows"].append(x)``);
  numpy arrays (per element for ``a[i]``, else the whole array: ``a[2:5] = ...``,
  ``np.add(a, 1, out=a)``, ``a += 1``) and bytearrays held in attributes. A binding written once
  while serving, under a lock, and read without it (double-checked locking) is a safe one-time
  publication, not a race. Each race is reported once, with both accesses' stacks (file:line),
  the locks each held, and that nothing orders them. State set before serving
  (``__init__``/``setup()``), read-only state and thread-local state are never reported.
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
``__getattribute__``/``__setattr__`` record accesses, and lists/dicts/sets/bytearrays assigned to
its attributes are stored as recording subclasses (only when nothing else refers to the same
object, so aliasing never changes); numpy arrays as recording views (same memory). The standard
synchronisation primitives are patched while a checker is enabled and restored when the last one
closes. All of this happens only while a checker is enabled. See docs/thread-safety-checker.md.

This module is the facade; :class:`ThreadSafetyChecker` composes the parts, one job each:
``lockset`` (what each thread holds; the judgement of shared accesses), ``clocks`` (vector
clocks), ``syncpoints`` (happens-before edges from the standard primitives), ``instrument``
(tracked classes and locks), ``containers`` and ``arrays`` (recording containers, numpy arrays,
bytearrays), ``libraries`` (unsafe-library detection, module instrumentation), ``overlap``
(threads inside each method at once), ``report`` (findings, the report), ``active`` (the active
checker). Adapters reach it only through
:class:`~snakepit_bridge.threadsafety.hooks.CheckerHooks`.
"""
from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import types
from typing import Any, Optional

from ..declaration import is_declared_thread_safe
from ..interpreter import free_threaded_build, gil_enabled  # re-exported: part of this module's API
from . import active
from . import clocks, syncpoints
from .arrays import is_plain_ndarray
from .instrument import (
    DETACHED_KEY,
    LOCK_TYPES,
    STATE_KEY,
    WRAPPABLE,
    InstanceState,
    instance_dict,
    is_internal,
    lock_identity,
    original_class,
    recording_value,
    tracked_class,
)
from .libraries import instrument_loaded_modules, restore_module
from .lockset import LocksetState, enter_tool, exit_tool, lock_acquired, lock_released, per_thread, thread_token
from .overlap import EntryToken, MethodOverlap
from .report import (
    Findings,
    ThreadSafetyViolation,
    build_report,
    library_finding,
    race_finding,
    undeclared_finding,
    write_json_file,
)

__all__ = ["ThreadSafetyChecker", "ThreadSafetyViolation", "get_active_checker", "gil_enabled",
           "free_threaded_build"]

logger = logging.getLogger("snakepit_bridge.thread_safety")


def get_active_checker() -> Optional[ThreadSafetyChecker]:
    """The enabled checker adapters report to, or None."""
    return active.current


class ThreadSafetyChecker:
    """See the module docstring. ``enabled=True`` makes this the active checker."""

    def __init__(self, enabled: bool = True, strict_mode: bool = False, *,
                 log: Optional[logging.Logger] = None) -> None:
        self.enabled = bool(enabled)
        self.strict_mode = bool(strict_mode)
        self.log = log or logger
        # One lock for all of the checker's state (its parts share it: no lock order to get wrong).
        self._lock = threading.RLock()
        self._started = time.time()
        self._states: dict[int, InstanceState] = {}
        self._objects: dict[int, Any] = {}           # keeps tracked instances comparable by id
        self._accesses = LocksetState(self._lock)
        self._overlap = MethodOverlap(self._lock, self.log)
        self._findings = Findings(self._lock)
        self._lock_names: dict[int, str] = {}
        self._module_count = -1
        self._declarations: dict[str, bool] = {}
        self._instrumented: list[types.ModuleType] = []
        self._attach_count = 0
        self._sync_patched = False
        if self.enabled:
            active.current = self
            self._instrument_modules()
            syncpoints.enable()
            self._sync_patched = True

    # -- life cycle -----------------------------------------------------------------------------

    def check_declaration(self, adapter_cls: type) -> bool:
        """Reports an ``undeclared_thread_safety`` finding (once per class) when ``adapter_cls``
        lacks ``__thread_safe__ = True``. Returns whether it is declared."""
        declared = is_declared_thread_safe(adapter_cls)
        original = original_class(adapter_cls)
        path = f"{original.__module__}.{original.__qualname__}"
        if not self.enabled:
            return declared
        with self._lock:
            if path in self._declarations:
                return declared
            self._declarations[path] = declared
        if not declared:
            self._add_finding(undeclared_finding(original), raise_in_strict=False)
        return declared

    def attach(self, adapter: Any) -> None:
        """Start tracking ``adapter``: from now on it is serving. Idempotent."""
        if not self.enabled:
            return
        d = instance_dict(adapter)
        if d is not None:
            d.pop(DETACHED_KEY, None)
        st = self._register(adapter)
        if st is None:
            return
        with self._lock:
            if st.active:
                return
            # Containers assigned before serving with other references to them were left alone;
            # wrap those that only the instance refers to now (nothing runs concurrently yet).
            d = instance_dict(adapter) or {}
            for name, value in list(d.items()):
                if is_internal(name) or name in st.ignored:
                    continue
                if type(value) in WRAPPABLE:
                    refs = [r for r in gc.get_referrers(value) if r is not d]
                    if not refs:
                        d[name] = recording_value(value, st, name, True)
                elif is_plain_ndarray(value):
                    d[name] = recording_value(value, st, name, True)
                elif type(value) in LOCK_TYPES:
                    self._lock_names[lock_identity(value)] = f"self.{name}"
            self.activate(st)

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
                        d = object.__getattribute__(obj, "__dict__")
                        d.pop(STATE_KEY, None)
                        d[DETACHED_KEY] = self      # no lazy re-attach by a later method call
                        obj.__class__ = st.cls
                    except TypeError:
                        pass

    def close(self) -> None:
        """Detach everything, restore instrumented modules and stop being the active checker."""
        self.detach()
        with self._lock:
            for mod in self._instrumented:
                restore_module(mod)
            self._instrumented.clear()
            patched, self._sync_patched = self._sync_patched, False
        if patched:
            syncpoints.disable()
        if active.current is self:
            active.current = None

    def __enter__(self) -> ThreadSafetyChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what adapters call (threadsafety.hooks.CheckerHooks) -----------------------------------

    def adapter_created(self, adapter: Any) -> None:
        """A ThreadSafeAdapter was built while this checker is active: what the building thread
        does with it until it serves is initialisation, not sharing."""
        self._register(adapter)

    def method_entered(self, adapter: Any, name: str) -> Optional[EntryToken]:
        """A ``@thread_safe_method`` call starts in this thread; returns what method_exited takes."""
        if not self.enabled:
            return None
        d = instance_dict(adapter) or {}
        st = d.get(STATE_KEY)
        if st is None or st.detached or st.checker is not self:
            if d.get(DETACHED_KEY) is self:
                return None
            st = self._register(adapter)
        if st is not None and not st.active:
            self.activate(st)
        cls_name = st.cls_name if st is not None else type(adapter).__qualname__
        tok = per_thread.__dict__.get("token") or thread_token()
        enter_tool(name)
        entry = self._overlap.enter(cls_name, name, tok)
        if len(sys.modules) != self._module_count:
            self._instrument_modules()
        return entry

    def method_exited(self, entry: Optional[EntryToken]) -> None:
        if entry is None:
            return
        exit_tool()
        self._overlap.exit(entry)

    def lock_acquired(self, lock: object) -> None:
        """This thread now holds the adapter lock ``lock`` (``acquire_lock()``): in its lockset,
        and ordered after the lock's previous holder (happens-before)."""
        lock_acquired(id(lock))
        clocks.lock_acquire(id(lock))

    def lock_released(self, lock: object) -> None:
        lock_released(id(lock))
        clocks.lock_release(id(lock))

    def lock_named(self, lock: Any, name: str) -> None:
        """A lock read from the adapter's attribute ``name`` (see instrument.AccessRecorder)."""
        self._lock_names.setdefault(lock_identity(lock), f"self.{name}")

    # -- what instrumented objects call (instrument.AccessRecorder, libraries.RecordingModule) ---

    def activate(self, st: InstanceState) -> None:
        if st.active:
            return
        with self._lock:
            st.active = True
        self._instrument_modules()

    def record_access(self, st: InstanceState, attr: str, part: tuple, write: bool,
                      frame: types.FrameType, commutes: bool = False) -> None:
        conflict = self._accesses.record_attribute(st, attr, part, write, frame, commutes)
        if conflict is not None:
            self._add_finding(race_finding(st.cls, st.cls_name, attr, conflict, self._lock_names,
                                           lambda m: self._overlap.peak(st.cls_name, m),
                                           strict=self.strict_mode), raise_in_strict=True)

    def record_library_object(self, st: InstanceState, attr: str, value: Any, lib: str,
                              frame: types.FrameType) -> None:
        obj_desc = f"{type(value).__module__.lstrip('_')}.{type(value).__qualname__}"
        self._record_library_use(("object", st.obj_id, attr, id(value)), lib,
                                 f"{obj_desc} held in attribute '{attr}' of {st.cls_name}",
                                 frame, attribute=attr, adapter=st.cls_name)

    def record_library_module(self, modname: str, lib: str, name: str,
                              frame: types.FrameType) -> None:
        self._record_library_use(("module", modname), lib,
                                 f"module-level {modname} state ({modname}.{name} and others)",
                                 frame)

    # -- internals ------------------------------------------------------------------------------

    def _register(self, obj: Any) -> Optional[InstanceState]:
        if not self.enabled:
            return None
        d = instance_dict(obj)
        if d is None:
            return None
        st = d.get(STATE_KEY)
        if st is not None and not st.detached:
            if st.checker is not self:
                old = st.checker
                if isinstance(old, ThreadSafetyChecker):
                    old._forget(st)
                st.checker = self
                with self._lock:
                    self._states[st.obj_id] = st
                    self._objects[st.obj_id] = obj
            return st
        original = original_class(type(obj))
        st = InstanceState(self, obj, original)
        try:
            tracked = tracked_class(original)
            d[STATE_KEY] = st
            if type(obj) is not tracked:
                obj.__class__ = tracked
        except TypeError as exc:
            d.pop(STATE_KEY, None)
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
            if type(value) in LOCK_TYPES and not is_internal(name):
                self._lock_names[lock_identity(value)] = f"self.{name}"
        for klass in original.__mro__:
            for name, value in klass.__dict__.items():
                if type(value) in LOCK_TYPES:
                    self._lock_names.setdefault(lock_identity(value), f"self.{name}")
        self.check_declaration(original)
        return st

    def _forget(self, st: InstanceState) -> None:
        """``st`` moves to another checker."""
        with self._lock:
            self._states.pop(st.obj_id, None)
            self._objects.pop(st.obj_id, None)

    def _instrument_modules(self) -> None:
        self._module_count = len(sys.modules)
        swapped = instrument_loaded_modules()
        if swapped:
            with self._lock:
                self._instrumented.extend(swapped)

    def _record_library_use(self, key: tuple, lib: str, what: str, frame: types.FrameType,
                            **extra: Any) -> None:
        conflict = self._accesses.record_library_use(key, frame)
        if conflict is not None:
            self._add_finding(library_finding(lib, what, conflict, self._lock_names,
                                              strict=self.strict_mode, **extra),
                              raise_in_strict=True)

    def _add_finding(self, finding: dict, *, raise_in_strict: bool) -> None:
        self._findings.add(finding, log=self.log, raise_violation=raise_in_strict and self.strict_mode)

    # -- report ---------------------------------------------------------------------------------

    @property
    def findings(self) -> list[dict]:
        return self._findings.snapshot()

    def get_report(self) -> dict:
        """A JSON-serialisable report: interpreter facts, findings, per-method overlap."""
        with self._lock:
            findings = [dict(f) for f in self._findings.snapshot()]
            methods = self._overlap.summary()
            tracked = sorted({f"{st.cls.__module__}.{st.cls.__qualname__}"
                              for st in self._states.values()})
            variables = len(self._accesses.attributes)
            declarations = dict(self._declarations)
        return build_report(enabled=self.enabled, strict_mode=self.strict_mode, started=self._started,
                            findings=findings, methods=methods, tracked_adapters=tracked,
                            tracked_variables=variables, declarations=declarations)

    def write_report(self, path: str) -> str:
        return write_json_file(self.get_report(), path)
