"""The active checker: the one enabled ThreadSafetyChecker that adapters and instrumented modules
report to (None, the common case, when nothing is being checked).

A checker created with ``enabled=True`` becomes it; ``close()`` stops it being it. Adapters see it
through :func:`snakepit_bridge.threadsafety.hooks.get_active_checker`, as ``CheckerHooks``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from . import ThreadSafetyChecker

current: Optional[ThreadSafetyChecker] = None
