"""Recording containers: lists, dicts and sets held by a tracked adapter (and, to a bounded depth,
the containers inside them) report reads and changes of their contents.

Dicts are tracked per key and lists per index (``d[k]``, ``d.get(k)``, ``k in d``, ``lst[i]``,
``lst[i] = v``): distinct keys do not race, colliding keys do. Each such element access is also a
*commuting* access of the whole container, so that it still conflicts with whole-container ones
(iterating, ``len``, ``clear``, ``update``, ``append``), which are not. Past
:data:`MAX_TRACKED_KEYS` keys of one container, further keys count as the whole container.

A container stored with other references to it is left alone (wrapping it would make a copy, and
aliasing would change); one built fresh for the assignment, or held only by its parent container
when that is wrapped, is replaced by a recording copy.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from .lockset import per_thread, thread_token

_getframe = sys._getframe

MAX_TRACKED_KEYS = 128
MAX_DEPTH = 3            # the attribute's container is depth 0

# What a recording container reports as: (instance state, attribute, path of keys from the
# attribute's container to this one, the keys tracked one by one so far)
Owner = tuple


def _report(owner: Owner, part: tuple, write: bool, commutes: bool, depth: int) -> None:
    st = owner[0]
    if st.detached:
        return
    if thread_token() == st.creator and not per_thread.__dict__.get("tools"):
        return
    if not st.active:
        st.checker.activate(st)
    # frame 0: _report, 1: _touch*, 2: the container method, 3: the code that called it
    st.checker.record_access(st, owner[1], part, write, _getframe(depth), commutes)


def _touch(container, write: bool, values: bool = False) -> None:
    """A whole-container access: of its structure (which keys / how many elements), and with
    ``values`` of every element's value too (iterating a list, ``dict.values()``)."""
    owner = container._sp_owner
    if owner is not None:
        _report(owner, ("contents", owner[2]), write, False, 3)
        if values:
            _report(owner, ("values", owner[2]), False, False, 3)


def _touch_element(container, key: Any, write: bool, structure_write: bool = False) -> None:
    """``key`` of ``container`` read or written; ``structure_write``: a key added or removed.

    Three variables: the element; the container's structure, which element accesses only read
    (commuting), unless they add or remove a key; and all its values, which element writes write
    (commuting), so that reading them all (``values()``, iterating a list) conflicts with them."""
    owner = container._sp_owner
    if owner is None:
        return
    keys = owner[3]
    try:
        tracked = key in keys or (len(keys) < MAX_TRACKED_KEYS and (keys.add(key) or True))
    except TypeError:         # unhashable: the operation itself will say so
        tracked = False
    path = owner[2]
    if not tracked:
        _report(owner, ("contents", path), write or structure_write, False, 3)
        if write:
            _report(owner, ("values", path), True, False, 3)
        return
    _report(owner, ("item", path, key), write, False, 3)
    _report(owner, ("contents", path), structure_write, True, 3)
    if write:
        _report(owner, ("values", path), True, True, 3)


def _list_index(container, index: Any) -> Any:
    """``index`` as the element it names, or None for a slice or anything else."""
    if type(index) is int:
        return index + list.__len__(container) if index < 0 else index
    return None


def _make_recording_type(base: type, writes: tuple, reads: tuple, extra: dict,
                         value_reads: tuple = ()) -> type:
    ns: dict[str, Any] = {"__slots__": ("_sp_owner",)}

    def make(name: str, write: bool, values: bool = False):
        original = getattr(base, name)

        def method(self, *args, **kwargs):
            _touch(self, write, values)
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
    for n in value_reads:
        if hasattr(base, n):
            ns[n] = make(n, False, True)
    ns.update(extra)

    def __reduce_ex__(self, protocol):
        # copies and pickles are plain containers
        return (base, (base(self),))

    ns["__reduce_ex__"] = __reduce_ex__
    ns["__module__"] = __name__
    return type(f"Recording{base.__name__.title()}", (base,), ns)


# -- dict: per key ------------------------------------------------------------------------------

_MISSING = object()


def _dict_getitem(self, key):
    _touch_element(self, key, False)
    return dict.__getitem__(self, key)


def _dict_get(self, key, default=None):
    _touch_element(self, key, False)
    return dict.get(self, key, default)


def _dict_contains(self, key):
    _touch_element(self, key, False)
    return dict.__contains__(self, key)


def _dict_setitem(self, key, value):
    owner = self._sp_owner
    if owner is not None:
        value = _wrap_fresh_child(value, owner, key, sys.getrefcount(value) - _FRESH_BY_SLOT)
        _touch_element(self, key, True, not dict.__contains__(self, key))
    dict.__setitem__(self, key, value)


def _dict_delitem(self, key):
    _touch_element(self, key, True, True)
    dict.__delitem__(self, key)


def _dict_pop(self, key, default=_MISSING):
    _touch_element(self, key, True, True)
    if default is _MISSING:
        return dict.pop(self, key)
    return dict.pop(self, key, default)


def _dict_setdefault(self, key, default=None):
    owner = self._sp_owner
    if owner is not None:
        present = dict.__contains__(self, key)
        if not present:
            default = _wrap_fresh_child(default, owner, key,
                                        sys.getrefcount(default) - _FRESH_BY_CALL)
        _touch_element(self, key, not present, not present)
    return dict.setdefault(self, key, default)


_RecordingDict = _make_recording_type(
    dict,
    ("popitem", "clear", "update", "__ior__"),
    ("__iter__", "__len__", "keys"),
    {"__getitem__": _dict_getitem, "get": _dict_get, "__contains__": _dict_contains,
     "__setitem__": _dict_setitem, "__delitem__": _dict_delitem, "pop": _dict_pop,
     "setdefault": _dict_setdefault},
    ("values", "items", "copy"),
)


# -- list: per index ----------------------------------------------------------------------------

def _list_getitem(self, index):
    i = _list_index(self, index)
    if i is None:
        _touch(self, False, True)
    else:
        _touch_element(self, i, False)
    return list.__getitem__(self, index)


def _list_setitem(self, index, value):
    i = _list_index(self, index)
    if i is None:
        _touch(self, True)
    else:
        _touch_element(self, i, True)
    list.__setitem__(self, index, value)


def _list_append(self, value):
    owner = self._sp_owner
    if owner is not None:
        value = _wrap_fresh_child(value, owner, list.__len__(self),
                                  sys.getrefcount(value) - _FRESH_BY_CALL)
        _report(owner, ("contents", owner[2]), True, False, 2)
    list.append(self, value)


_RecordingList = _make_recording_type(
    list,
    ("extend", "insert", "pop", "remove", "clear", "sort", "reverse", "__delitem__", "__iadd__",
     "__imul__"),
    ("__len__",),
    {"__getitem__": _list_getitem, "__setitem__": _list_setitem, "append": _list_append},
    ("__iter__", "__contains__", "index", "count", "copy", "__reversed__"),
)

_RecordingSet = _make_recording_type(
    set,
    ("add", "discard", "remove", "pop", "clear", "update", "difference_update",
     "intersection_update", "symmetric_difference_update", "__ior__", "__iand__", "__isub__",
     "__ixor__"),
    ("__contains__", "__iter__", "__len__", "copy", "issubset", "issuperset", "isdisjoint",
     "union", "intersection", "difference", "symmetric_difference"),
    {},
)
RECORDING: dict[type, type] = {list: _RecordingList, dict: _RecordingDict, set: _RecordingSet}


def wrap_container(value, st, attr: str, path: tuple = ()) -> Any:
    """A recording copy of the list/dict/set ``value``, reporting as ``attr``'s contents (at
    ``path`` inside it); its own containers that nothing else refers to are wrapped too."""
    w = RECORDING[type(value)](value)
    owner: Owner = (st, attr, path, set())
    if len(path) < MAX_DEPTH and not isinstance(w, set):
        keys = list(dict.keys(w)) if isinstance(w, dict) else range(list.__len__(w))
        for k in keys:
            child = dict.__getitem__(w, k) if isinstance(w, dict) else list.__getitem__(w, k)
            # held by the original, the copy and `child` (and getrefcount's argument)
            if type(child) in RECORDING and sys.getrefcount(child) <= _HELD_BY_TWO_CONTAINERS:
                wrapped = wrap_container(child, st, attr, path + (k,))
                if isinstance(w, dict):
                    dict.__setitem__(w, k, wrapped)
                else:
                    list.__setitem__(w, k, wrapped)
    w._sp_owner = owner
    return w


def _wrap_fresh_child(value, owner: Owner, key: Any, extra_refs: int) -> Any:
    """``value``, about to be stored in a recording container under ``key``: a recording copy
    when it is a container nobody else refers to yet (``extra_refs``: its refcount where measured,
    less that of a fresh value there)."""
    if type(value) not in RECORDING or len(owner[2]) >= MAX_DEPTH or extra_refs > 0 or \
            _FRESH_BY_SLOT < 0:
        return value
    return wrap_container(value, owner[0], owner[1], owner[2] + (key,))


def _calibrate() -> tuple[int, int, int]:
    """The refcounts that mean "nobody else refers to it": of a value passed to a recording
    container's method through a slot (``d[k] = []``) and by a call (``d.setdefault(k, [])``,
    ``lst.append([])``), and of a child held by two containers (the original and its copy).
    -1: cannot be told apart from an aliased value."""
    seen: list[int] = []

    class Probe(dict):
        def __setitem__(self, key, value):
            seen.append(sys.getrefcount(value))

        def setdefault(self, key, default=None):
            seen.append(sys.getrefcount(default))

    p = Probe()
    p["a"] = []
    p.setdefault("b", [])
    alias: list = []
    p["c"] = alias
    p.setdefault("d", alias)
    by_slot, by_call, slot_alias, call_alias = seen
    if slot_alias <= by_slot or call_alias <= by_call:
        by_slot = by_call = -1
    del alias
    outer: list = [[]]
    copy = list(outer)
    child = list.__getitem__(copy, 0)
    two = sys.getrefcount(child)
    extra = [child]
    held = two if sys.getrefcount(child) > two else -1
    del outer, extra, child
    return by_slot, by_call, held


try:
    _FRESH_BY_SLOT, _FRESH_BY_CALL, _HELD_BY_TWO_CONTAINERS = _calibrate()
except Exception:  # pragma: no cover - never let calibration break imports
    _FRESH_BY_SLOT, _FRESH_BY_CALL, _HELD_BY_TWO_CONTAINERS = -1, -1, -1


def owner_of(value) -> Optional[Owner]:
    return getattr(value, "_sp_owner", None)
