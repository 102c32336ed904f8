"""Immutable-after-construction objects and read-only mappings.

A request context is built once and then shared by whatever threads serve
the request; if it cannot change, it needs no lock.  :class:`Frozen` makes
instances immutable as soon as construction finishes::

    class RequestContext(Frozen):
        def __init__(self, session_id, metadata):
            self.session_id = session_id
            self.metadata = frozen_mapping(metadata)   # nested dicts read-only too

    ctx = RequestContext("s1", {"user": {"id": 7}})
    ctx.session_id = "s2"          # FrozenError: cannot assign to 'session_id'
    ctx.metadata["user"]["id"] = 8  # TypeError: mappingproxy is read-only

Assignment, deletion and unfreezing all raise :class:`FrozenError` (an
``AttributeError``) naming the attribute.  Values that are themselves mutable
(lists, plain dicts, objects) stay mutable: wrap them with
:func:`frozen_mapping` / tuples.  As everywhere in Python,
``object.__setattr__`` can bypass this; the guard is against accidents, not
malice.
"""

from __future__ import annotations

import abc
import types
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["FrozenError", "Frozen", "freeze", "is_frozen", "frozen_mapping", "thaw"]

_FLAG = "_Frozen__frozen"
F = TypeVar("F", bound="Frozen")


class FrozenError(AttributeError):
    """An attempt to change a frozen object.

    Same signature as ``AttributeError``: ``FrozenError(message, name=..., obj=...)``;
    ``name`` is the attribute when known.
    """


def _frozen_error(obj: object, name: str, action: str = "assign to") -> FrozenError:
    hint = getattr(type(obj), "_frozen_hint", None)
    return FrozenError(
        f"cannot {action} attribute {name!r} of frozen {type(obj).__name__}"
        + (f" ({hint})" if hint else ""),
        name=name,
        obj=obj,
    )


class _FrozenMeta(abc.ABCMeta):
    # Freezing in the metaclass' __call__ runs after the *whole* construction,
    # however __init__ is produced (hand-written, super() chains, @dataclass).
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        if getattr(cls, "_frozen_auto", True) and isinstance(obj, Frozen):
            object.__setattr__(obj, _FLAG, True)
        return obj


class Frozen(metaclass=_FrozenMeta):
    """Mixin: instances become immutable once construction finishes.

    ``class C(Frozen, auto_freeze=False)`` defers freezing to an explicit
    :func:`freeze` call (build, then publish).  ``frozen_hint="..."`` adds what
    to do instead to every FrozenError's message (subclasses inherit it).
    Frozen instances pickle and copy as frozen instances, :func:`frozen_mapping`
    values included.
    """

    __slots__ = (_FLAG,)

    def __init_subclass__(cls, auto_freeze: bool = True, frozen_hint: str | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setattr(cls, "_frozen_auto", auto_freeze)
        if frozen_hint is not None:
            setattr(cls, "_frozen_hint", frozen_hint)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == _FLAG or is_frozen(self):
            raise _frozen_error(self, name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name == _FLAG or is_frozen(self):
            raise _frozen_error(self, name, "delete")
        object.__delattr__(self, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild, (type(self), _to_picklable(_state_of(self)), is_frozen(self)))


def freeze(obj: F) -> F:
    """Freeze a :class:`Frozen` instance now (for ``auto_freeze=False`` classes); returns it."""
    if not isinstance(obj, Frozen):
        raise TypeError(f"freeze() needs a Frozen instance, got {type(obj).__name__}")
    object.__setattr__(obj, _FLAG, True)
    return obj


def is_frozen(obj: object) -> bool:
    """Whether ``obj`` is a frozen :class:`Frozen` instance."""
    try:
        return object.__getattribute__(obj, _FLAG) is True
    except AttributeError:
        return False


def frozen_mapping(d: Mapping[Any, Any], *, deep: bool = True) -> types.MappingProxyType:
    """A read-only snapshot of ``d`` as a ``types.MappingProxyType``.

    The snapshot is a copy: later changes to ``d`` do not show through.  With
    ``deep`` (the default) nested mappings become read-only snapshots too,
    lists become tuples and sets frozensets, so nothing reachable through the
    result can be changed.  Use :func:`thaw` to get plain (JSON-serializable)
    dicts and lists back.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"frozen_mapping() needs a mapping, got {type(d).__name__}")
    if not deep:
        return types.MappingProxyType(dict(d))
    return types.MappingProxyType({k: _deep_freeze(v) for k, v in d.items()})


def _deep_freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return frozen_mapping(value)
    if isinstance(value, (list, tuple)):
        return tuple(_deep_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_deep_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A mutable deep copy: mappings -> dict, tuples/lists -> list, sets -> set."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {thaw(v) for v in value}
    return value


# -- pickling / copying ----------------------------------------------------------------
class _ProxyState(dict):
    """Pickle stand-in for a MappingProxyType (which cannot be pickled)."""


def _to_picklable(value: Any) -> Any:
    if isinstance(value, types.MappingProxyType):
        return _ProxyState({k: _to_picklable(v) for k, v in value.items()})
    if type(value) is dict:
        return {k: _to_picklable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_to_picklable(v) for v in value)
    return value


def _from_picklable(value: Any) -> Any:
    if isinstance(value, _ProxyState):
        return types.MappingProxyType({k: _from_picklable(v) for k, v in value.items()})
    if type(value) is dict:
        return {k: _from_picklable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_from_picklable(v) for v in value)
    return value


def _state_of(obj: object) -> dict[str, Any]:
    state = dict(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        for name in klass.__dict__.get("__slots__", ()):
            if name in (_FLAG, "__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"  # private-name mangling
            try:
                state[name] = object.__getattribute__(obj, name)
            except AttributeError:
                pass
    return state


def _rebuild(cls: type, state: dict[str, Any], frozen: bool) -> Any:
    obj: Any = cls.__new__(cls)  # type: ignore[call-overload]  # cls is a Frozen subclass, not `type`
    for name, value in _from_picklable(state).items():
        object.__setattr__(obj, name, value)
    if frozen:
        object.__setattr__(obj, _FLAG, True)
    return obj
