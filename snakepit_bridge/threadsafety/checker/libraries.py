"""Library detection: which libraries are unsafe to share between threads, how their objects are
recognised, and the module class swapped onto ``pandas`` / ``matplotlib.pyplot`` so that uses of
their module-level state are reported to the active checker."""
from __future__ import annotations

import sys
import threading
import types
from typing import Optional

from . import active
from .lockset import current_tool

_getframe = sys._getframe
_module_getattribute = types.ModuleType.__getattribute__

# library -> what to do about it (the end of the finding's message and advice)
UNSAFE_LIBRARIES = {
    "pandas": "Pandas is not thread-safe: use locking (`with self.acquire_lock():`) or process mode.",
    "matplotlib": "Matplotlib is not thread-safe: use threading.local() for figures (one Figure per "
                  "thread, no pyplot state machine), locking, or process mode.",
    "sqlite3": "SQLite3 objects are not thread-safe: use a connection per thread "
               "(get_thread_local/set_thread_local), locking, or process mode.",
}
# modules whose module-level state is shared (module name -> library)
UNSAFE_MODULES = {"pandas": "pandas", "matplotlib.pyplot": "matplotlib"}
# callers whose module-level use is the libraries' own business (and the import machinery's)
_LIBRARY_INTERNALS = frozenset({"pandas", "matplotlib", "mpl_toolkits", "importlib",
                                "_frozen_importlib", "_frozen_importlib_external", "numpy"})
# ... and the checker's own
_CHECKER_PACKAGE = __name__.rpartition(".")[0]


def unsafe_library_of(value) -> Optional[str]:
    """The unsafe library ``value`` is an object of (by its type's module), or None."""
    mod = type(value).__module__
    if not mod:
        return None
    root = mod.partition(".")[0]
    if root in UNSAFE_LIBRARIES:
        return root
    if root == "_sqlite3":
        return "sqlite3"
    return None


class RecordingModule(types.ModuleType):
    """Module class swapped onto pandas / matplotlib.pyplot while a checker is enabled."""

    def __getattribute__(self, name):
        value = _module_getattribute(self, name)
        if name[:1] == "_":
            return value
        checker = active.current
        if checker is None:
            return value
        frame = _getframe(1)
        modname = _module_getattribute(self, "__name__")
        lib = UNSAFE_MODULES.get(modname)
        caller = frame.f_globals.get("__name__", "") or ""
        if lib is None or caller.partition(".")[0] in _LIBRARY_INTERNALS or \
                caller.startswith(_CHECKER_PACKAGE):
            return value
        if current_tool() is None and threading.current_thread() is threading.main_thread():
            return value
        checker.record_library_module(modname, lib, name, frame)
        return value


def instrument_loaded_modules() -> list[types.ModuleType]:
    """Swap RecordingModule onto the unsafe modules imported so far; returns those it swapped."""
    swapped = []
    for modname in UNSAFE_MODULES:
        mod = sys.modules.get(modname)
        if mod is not None and type(mod) is types.ModuleType:
            try:
                mod.__class__ = RecordingModule
            except TypeError:
                continue
            swapped.append(mod)
    return swapped


def restore_module(mod: types.ModuleType) -> None:
    """Undo instrument_loaded_modules() for ``mod``."""
    try:
        if type(mod) is RecordingModule:
            mod.__class__ = types.ModuleType  # type: ignore[assignment]
    except TypeError:
        pass
