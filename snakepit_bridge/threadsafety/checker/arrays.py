"""Recording arrays: numpy arrays and bytearrays held by a tracked adapter report writes to their
contents (``self.buf[i] += 1``, ``self.buf[2:5] = ...``, ``np.add(a, 1, out=a)``, ``a += 1``,
``a.fill(0)``) and reads (indexing, ufunc inputs).

A numpy array is stored as a *view* of itself of a recording subclass: it shares the memory, so
every other reference still sees and makes the same changes (they are just not seen by the checker);
``self.buf is original`` becomes false, ``isinstance(self.buf, np.ndarray)`` stays true. Writes to
one integer element (``a[i] = v``, ``a[i, j] += 1``) are per element, like list indices; anything
else is the whole array. What numpy returns from a recording array (slices, results) is a plain
array. A bytearray is copied, so only one built for the assignment is wrapped (like lists).

numpy is never imported here: the recording subclass is made the first time an ndarray is stored.
"""
from __future__ import annotations

from typing import Any, Optional

from .containers import MAX_TRACKED_KEYS, _report

_ARRAY_TYPE: list[Optional[type]] = [None]
_ND: list[Any] = [None]


def _element(array, index: Any) -> Any:
    """``index`` as one element (a tuple of non-negative ints), or None."""
    if type(index) is int:
        index = (index,)
    if type(index) is tuple and index and all(type(i) is int for i in index) and \
            len(index) == array.ndim:
        shape = array.shape
        return tuple(i + shape[n] if i < 0 else i for n, i in enumerate(index))
    return None


def _touch(array, index: Any, write: bool) -> None:
    owner = array.__dict__.get("_sp_owner") if hasattr(array, "__dict__") else None
    if owner is None:
        return
    path = owner[2]
    key = _element(array, index) if index is not None else None
    keys = owner[3]
    if key is not None and (key in keys or len(keys) < MAX_TRACKED_KEYS):
        keys.add(key)
        # frame 0: _report, 1: _touch, 2: the array method, 3: the caller
        _report(owner, ("item", path, key), write, False, 3)
        _report(owner, ("contents", path), write, True, 3)    # conflicts with whole-array reads
    else:
        _report(owner, ("contents", path), write, False, 3)


def _plain(x):
    nd = _ND[0]
    return x.view(nd) if isinstance(x, _ARRAY_TYPE[0]) else x


def _array_type() -> type:
    t = _ARRAY_TYPE[0]
    if t is not None:
        return t
    import numpy as np

    _ND[0] = np.ndarray

    class RecordingArray(np.ndarray):
        """An ndarray view that reports reads and writes to the checker (see the module)."""

        def __array_finalize__(self, obj):
            pass      # views numpy makes from this one carry no owner: not recorded

        def __getitem__(self, index):
            _touch(self, index, False)
            return np.ndarray.__getitem__(self.view(np.ndarray), index)

        def __setitem__(self, index, value):
            _touch(self, index, True)
            np.ndarray.__setitem__(self.view(np.ndarray), index, _plain(value))

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            out = kwargs.get("out")
            outs = out if isinstance(out, tuple) else ((out,) if out is not None else ())
            for o in outs:
                if isinstance(o, RecordingArray):
                    _touch(o, None, True)
            for i in inputs:
                if isinstance(i, RecordingArray) and not any(i is o for o in outs):
                    _touch(i, None, False)
            inputs = tuple(_plain(i) for i in inputs)
            if outs:
                kwargs["out"] = tuple(_plain(o) for o in outs)
            result = getattr(ufunc, method)(*inputs, **kwargs)
            if outs and method == "__call__" and ufunc.nout == 1:
                return outs[0]        # in-place operators return the array itself
            return result

        def fill(self, value):
            _touch(self, None, True)
            return np.ndarray.fill(self.view(np.ndarray), value)

        def sort(self, *args, **kwargs):
            _touch(self, None, True)
            return np.ndarray.sort(self.view(np.ndarray), *args, **kwargs)

        def __reduce_ex__(self, protocol):
            return self.view(np.ndarray).__reduce_ex__(protocol)

    RecordingArray.__module__ = __name__
    _ARRAY_TYPE[0] = RecordingArray
    return RecordingArray


def is_plain_ndarray(value: Any) -> bool:
    """An ndarray not yet recording for an attribute (a plain one, or a copy/view numpy made of a
    recording one)."""
    t = type(value)
    if t is _ARRAY_TYPE[0]:
        return "_sp_owner" not in value.__dict__
    return t.__name__ == "ndarray" and t.__module__ == "numpy"


def wrap_array(value, st, attr: str) -> Any:
    """A recording view of the ndarray ``value``, reporting as ``attr``'s contents."""
    view = value.view(_array_type())
    view.__dict__["_sp_owner"] = (st, attr, (), set())
    return view


class RecordingBytearray(bytearray):
    """A bytearray that reports reads and writes of its contents."""

    __slots__ = ("_sp_owner",)

    def __getitem__(self, index):
        _touch_bytes(self, index, False)
        return bytearray.__getitem__(self, index)

    def __setitem__(self, index, value):
        _touch_bytes(self, index, True)
        bytearray.__setitem__(self, index, value)

    def __iadd__(self, other):  # type: ignore[misc]
        _touch_bytes(self, None, True)
        return bytearray.__iadd__(self, other)

    def extend(self, other):
        _touch_bytes(self, None, True)
        return bytearray.extend(self, other)

    def append(self, item):
        _touch_bytes(self, None, True)
        return bytearray.append(self, item)

    def __reduce_ex__(self, protocol):
        return (bytearray, (bytes(self),))


def _touch_bytes(b, index: Any, write: bool) -> None:
    owner = b._sp_owner
    if owner is None:
        return
    keys = owner[3]
    if type(index) is int and (index in keys or len(keys) < MAX_TRACKED_KEYS):
        i = index + len(b) if index < 0 else index
        keys.add(i)
        _report(owner, ("item", owner[2], i), write, False, 3)
        _report(owner, ("contents", owner[2]), write, True, 3)
    else:
        _report(owner, ("contents", owner[2]), write, False, 3)


def wrap_bytearray(value, st, attr: str) -> RecordingBytearray:
    w = RecordingBytearray(value)
    w._sp_owner = (st, attr, (), set())  # type: ignore[attr-defined]
    return w

