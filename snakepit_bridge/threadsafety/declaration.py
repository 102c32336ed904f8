"""The ``__thread_safe__ = True`` declaration: the one rule for whether an adapter class makes it,
and the one message for one that does not.

The threaded server's start-up gate (refusal, or a warning with ``--allow-unsafe-adapter``) and the
checker's ``undeclared_thread_safety`` finding all use these, so they agree on what counts as
declared and say the same thing about it.
"""
from __future__ import annotations

import logging
from typing import Optional

__all__ = ["UnsafeAdapterError", "is_declared_thread_safe", "require_thread_safe_declaration",
           "undeclared_adapter_message", "UNDECLARED_ADAPTER_ADVICE"]

logger = logging.getLogger(__name__)

# The fix in one line, for the checker's finding ("advice") next to the full message.
UNDECLARED_ADAPTER_ADVICE = "Add `__thread_safe__ = True` to your adapter class."


class UnsafeAdapterError(RuntimeError):
    """The threaded server was asked to run an adapter that does not declare ``__thread_safe__``."""


def is_declared_thread_safe(adapter_cls: type) -> bool:
    """True when the class (or a user base class) sets ``__thread_safe__ = True`` (exactly True: the
    declaration is a promise, not a truthy value)."""
    return getattr(adapter_cls, "__thread_safe__", False) is True


def undeclared_adapter_message(adapter_cls: type) -> str:
    """What is said wherever an undeclared adapter is met: its name, the fix, the alternatives."""
    # The first sentence is the guide's ("⚠️  Adapter MyAdapter does not declare thread safety.").
    return (f"Adapter {adapter_cls.__name__} does not declare thread safety. Once its tools are safe to "
            f"run in several threads at once, add `__thread_safe__ = True` to class "
            f"{adapter_cls.__module__}.{adapter_cls.__qualname__}; until then serve it with "
            f"grpc_server_process.py, or pass --allow-unsafe-adapter to run it in the threaded server "
            f"anyway.")


def require_thread_safe_declaration(adapter_cls: type, *, allow_unsafe: bool = False,
                                    log: Optional[logging.Logger] = None) -> bool:
    """The threaded server's gate. Returns True when declared; raises :class:`UnsafeAdapterError`
    with :func:`undeclared_adapter_message` when not, unless ``allow_unsafe``
    (``--allow-unsafe-adapter``), which logs that message as a warning and returns False."""
    if is_declared_thread_safe(adapter_cls):
        return True
    message = undeclared_adapter_message(adapter_cls)
    if not allow_unsafe:
        raise UnsafeAdapterError(message)
    (log or logger).warning("⚠️  %s", message)
    return False
