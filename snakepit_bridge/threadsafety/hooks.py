"""CheckerHooks: everything ``ThreadSafeAdapter``, ``@thread_safe_method`` and ``acquire_lock()``
tell the thread-safety checker, and how they find the one to tell.

The adapter side depends on this protocol only, not on how the checker works; with no checker
enabled (the common case) :func:`get_active_checker` returns None and nothing is told.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

from .checker import active as _active

__all__ = ["CheckerHooks", "MethodEntry", "get_active_checker"]

# What method_entered returns, handed back unchanged to method_exited; opaque to the adapter side.
MethodEntry = Any


class CheckerHooks(Protocol):
    def adapter_created(self, adapter: Any) -> None:
        """A ThreadSafeAdapter finished its base ``__init__``; until it serves, what the building
        thread does with it is set-up."""

    def method_entered(self, adapter: Any, name: str) -> Optional[MethodEntry]:
        """A ``@thread_safe_method`` call of ``adapter.name`` starts in this thread."""

    def method_exited(self, entry: Optional[MethodEntry]) -> None:
        """That call ended (returned, raised, or its generator finished); ``entry`` is what
        method_entered returned."""

    def lock_acquired(self, lock: object) -> None:
        """This thread took the adapter's lock (``acquire_lock()``)."""

    def lock_released(self, lock: object) -> None:
        """... and is about to release it."""


def get_active_checker() -> Optional[CheckerHooks]:
    """The enabled checker, as the adapter side sees it; None when none is enabled."""
    return _active.current
