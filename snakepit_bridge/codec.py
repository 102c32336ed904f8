"""The JSON + blobs value codec (see the header of proto/snakepit_bridge.proto).

`encode(value) -> (json_text, blobs)` and `decode(json_text, blobs) -> value` are exact inverses for
None, bool, int (any size), float (incl. nan/inf), str, bytes, list/tuple (decoded as list), dicts
with string keys, and numpy arrays (dtype and shape kept, raw buffer as a blob). Nothing is pickled.
"""
from __future__ import annotations

import json
import math
from typing import Any

TAG = "__snakepit__"
# One encoder for every call: json.dumps with non-default options builds a new encoder each time.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# For text with lone surrogates ("\ud800" arrived as a JSON escape): escaped, it is valid UTF-8 again.
_ASCII_JSON_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
_SCALARS = (type(None), bool, int, str)


class CodecError(ValueError):
    """A value that cannot be encoded, or JSON/blobs that do not decode. `field` names where."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def _numpy():
    # numpy is a hard dependency, but importing it lazily keeps `encode` of plain values cheap to import.
    import numpy

    return numpy


def encode(value: Any) -> tuple[str, list[bytes]]:
    """Encode a value tree as (JSON text, blobs)."""
    blobs: list[bytes] = []
    tree = value if type(value) in _SCALARS else _to_tree(value, blobs, "$")
    text = _JSON_ENCODER.encode(tree)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _ASCII_JSON_ENCODER.encode(tree)
    return text, blobs


def _to_tree(value: Any, blobs: list[bytes], path: str) -> Any:
    # Ordered by frequency: most values are plain JSON scalars.
    if value is None or value is True or value is False or type(value) is str or type(value) is int:
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        return {TAG: "float", "value": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"map keys must be strings, got {type(key).__name__} key {key!r} at {path}", path)
            out[key] = _to_tree(item, blobs, f"{path}.{key}")
        if TAG in out:
            return {TAG: "object", "value": out}
        return out
    if isinstance(value, (list, tuple)):
        return [_to_tree(item, blobs, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        blobs.append(bytes(value))
        return {TAG: "bytes", "blob": len(blobs) - 1}
    if isinstance(value, bool):  # numpy.bool_ is handled below; this is a bool subclass
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _to_tree(float(value), blobs, path)
    if isinstance(value, str):
        return str(value)
    np = _numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise CodecError(f"numpy arrays of dtype object cannot be encoded (at {path})", path)
        array = np.asarray(value, order="C")  # ascontiguousarray would turn 0-d arrays into shape (1,)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        blobs.append(array.tobytes())
        return {TAG: "ndarray", "blob": len(blobs) - 1, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, np.generic):
        return _to_tree(value.item(), blobs, path)
    if isinstance(value, (set, frozenset)):
        return [_to_tree(item, blobs, f"{path}[{i}]") for i, item in enumerate(sorted(value, key=repr))]
    raise CodecError(f"cannot encode value of type {type(value).__name__} at {path}", path)


def decode(json_text: str, blobs: list[bytes] | tuple[bytes, ...] = (), *, field: str = "json") -> Any:
    """Decode (JSON text, blobs) into Python values. Empty text decodes as None."""
    if not json_text:
        return None
    if json_text == "{}":
        return {}
    try:
        tree = json.loads(json_text)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"{field} is not valid JSON: {exc}", field) from None
    return _from_tree(tree, blobs, field)


def _from_tree(tree: Any, blobs, path: str) -> Any:
    if isinstance(tree, list):
        return [_from_tree(item, blobs, f"{path}[{i}]") for i, item in enumerate(tree)]
    if not isinstance(tree, dict):
        if isinstance(tree, float) and not math.isfinite(tree):
            return tree  # Python's json accepts NaN/Infinity literals; keep them as floats.
        return tree
    kind = tree.get(TAG)
    if kind is None:
        return {key: _from_tree(item, blobs, f"{path}.{key}") for key, item in tree.items()}
    if kind == "bytes":
        return _blob(tree, blobs, path)
    if kind == "ndarray":
        return _ndarray(tree, blobs, path)
    if kind == "float":
        text = tree.get("value")
        if text not in ("nan", "inf", "-inf"):
            raise CodecError(f"{path}: float tag needs value 'nan', 'inf' or '-inf', got {text!r}", path)
        return float(text)
    if kind == "object":
        inner = tree.get("value")
        if not isinstance(inner, dict):
            raise CodecError(f"{path}: object tag needs a JSON object as value", path)
        return {key: _from_tree(item, blobs, f"{path}.{key}") for key, item in inner.items()}
    raise CodecError(f"{path}: unknown {TAG} tag {kind!r}", path)


def _blob(tree: dict, blobs, path: str) -> bytes:
    index = tree.get("blob")
    if type(index) is not int or not 0 <= index < len(blobs):
        raise CodecError(f"{path}: blob index {index!r} out of range (have {len(blobs)} blobs)", path)
    return bytes(blobs[index])


def _ndarray(tree: dict, blobs, path: str):
    np = _numpy()
    data = _blob(tree, blobs, path)
    dtype_text, shape = tree.get("dtype"), tree.get("shape")
    try:
        dtype = np.dtype(dtype_text)
    except TypeError:
        raise CodecError(f"{path}: unknown ndarray dtype {dtype_text!r}", path) from None
    if dtype.hasobject:
        raise CodecError(f"{path}: ndarray dtype {dtype_text!r} holds Python objects", path)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"{path}: ndarray shape must be a list of non-negative integers, got {shape!r}", path)
    expected = dtype.itemsize * math.prod(shape)
    if expected != len(data):
        raise CodecError(
            f"{path}: ndarray of dtype {dtype.str} and shape {shape} needs {expected} bytes, blob has {len(data)}",
            path,
        )
    # bytearray makes the array writable; frombuffer over bytes would be read-only.
    return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
