"""The JSON + blobs value codec (see the header of proto/snakepit_bridge.proto).

`encode(value) -> (json_text, blobs)` and `decode(json_text, blobs) -> value` are exact inverses for
None, bool, int (any size), float (incl. nan/inf), str, bytes, list/tuple (decoded as list), dicts
with string keys, and numpy arrays (dtype and shape kept, raw buffer as a blob). Nothing is pickled.

Limits, the same both ways so that what one side encodes the other decodes:

* nesting: at most MAX_DEPTH (256) levels of lists and maps;
* integers: at most `sys.get_int_max_str_digits()` decimal digits (4300 unless the interpreter is
  started with PYTHONINTMAXSTRDIGITS or -X int_max_str_digits): CPython's guard against quadratic-time
  conversion, kept on purpose rather than switched off process-wide;
* arrays: at most MAX_NDIM (64) dimensions of a plain dtype (no objects, no fields, no sub-arrays,
  no zero-sized items), and exactly as many blob bytes as dtype and shape need.

Decoding is linear in the size of the input: the path that names a bad value (`args_json.x[3]`) is
built only when there is an error to report.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any

TAG = "__snakepit__"
MAX_DEPTH = 256
MAX_NDIM = 64
_MAX_DTYPE_TEXT = 64
# One encoder for every call: json.dumps with non-default options builds a new encoder each time.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# For text with lone surrogates ("\ud800" arrived as a JSON escape): escaped, it is valid UTF-8 again.
_ASCII_JSON_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _reused_c_encoder(encoder: json.JSONEncoder):
    """`encoder.encode` without building json's C encoder object anew on every call, as
    JSONEncoder.encode does (a few µs per call, the most of encoding a small result). Trees from
    `_to_tree` are acyclic and depth-limited, so the C encoder's cycle check (its per-call `markers`)
    is not needed. Falls back to `encoder.encode` where json has no C accelerator."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    string = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    c_encode = make(None, encoder.default, string, None, encoder.key_separator, encoder.item_separator,
                    False, False, encoder.allow_nan)
    join = "".join

    def encode(tree: Any) -> str:
        if type(tree) is str:
            return string(tree)
        return join(c_encode(tree, 0))

    return encode


_encode_json = _reused_c_encoder(_JSON_ENCODER)
_encode_ascii_json = _reused_c_encoder(_ASCII_JSON_ENCODER)
_SCALARS = (type(None), bool, int, str)
_PLAIN_JSON = frozenset((type(None), bool, int, float, str))


class CodecError(ValueError):
    """A value that cannot be encoded, or JSON/blobs that do not decode. `field` names where
    (`args_json.images[2]`); the message starts with it."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class _ValueError(Exception):
    """Raised deep in a value tree; each enclosing list or map adds its step to `steps` on the way
    out, so the path is built only for the value that failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.steps: list[str] = []

    def at(self, step: str) -> "_ValueError":
        self.steps.append(step)
        return self

    def codec_error(self, root: str) -> CodecError:
        steps = self.steps[::-1]
        if len(steps) > 16:  # a value nested hundreds of levels deep: name its ends
            steps = steps[:8] + [f"...({len(steps) - 16} levels)..."] + steps[-8:]
        path = root + "".join(steps)
        return CodecError(f"{path}: {self.message}", path)


def _key_step(key: Any) -> str:
    text = key if isinstance(key, str) else repr(key)
    return "." + (text if len(text) <= 64 else text[:61] + "...")


def _numpy():
    # numpy is a hard dependency, but importing it lazily keeps `encode` of plain values cheap to import.
    import numpy

    return numpy


class _Placing:
    """Large blobs of one `encode` going to shared-memory regions (shm.ResultRegions); what it placed."""

    __slots__ = ("regions", "min_bytes", "placed")

    def __init__(self, regions) -> None:
        self.regions = regions
        self.min_bytes = regions.min_bytes
        self.placed: list[str] = []

    def place(self, data) -> str:
        name = self.regions.place(data)
        self.placed.append(name)
        return name


class _BlobViews(list):
    """The blobs of an `encode(..., views=True)`: arrays go in as views of their memory, not copies."""


def encode(value: Any, regions=None, *, views: bool = False) -> tuple[str, list[bytes]]:
    """Encode a value tree as (JSON text, blobs). With `regions` (shm.ResultRegions), bytes and arrays
    of at least `regions.min_bytes` are written as shared-memory regions and referenced by name. With
    `views`, an array's blob is a memoryview of its (C-ordered) memory instead of a copy: for a caller
    that copies the blobs once into the outgoing message (wire.join) while the value is alive."""
    blobs: list[bytes] = _BlobViews() if views else []
    if type(value) in _SCALARS:
        tree = value
    else:
        placing = None if regions is None else _Placing(regions)
        try:
            tree = _to_tree(value, blobs, 0, placing)
        except BaseException as exc:
            if placing is not None:
                regions.remove(placing.placed)  # nobody will read them
            if isinstance(exc, _ValueError):
                raise exc.codec_error("$") from None
            raise
    if tree is None:
        return "null", blobs
    try:
        text = _encode_json(tree)
    except ValueError as exc:  # only integers past the digit limit get here: the tree is plain JSON
        raise _int_digits_error(tree, "$") from exc
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _encode_ascii_json(tree)
    return text, blobs


def _int_digits_error(tree: Any, root: str) -> CodecError:
    limit = sys.get_int_max_str_digits()
    steps = _find_big_int(tree, limit)
    path = root + "".join(steps or ())
    return CodecError(f"{path}: integer has more than {limit} decimal digits, the interpreter's limit "
                      "(sys.get_int_max_str_digits(); raise it with PYTHONINTMAXSTRDIGITS)", path)


def _find_big_int(tree: Any, limit: int) -> list[str] | None:
    """The path steps to the first integer too long to print (error path only)."""
    stack: list[tuple[Any, list[str]]] = [(tree, [])]
    while stack:
        node, steps = stack.pop()
        if type(node) is int:
            try:
                str(node)
            except ValueError:
                return steps
        if type(node) is list:
            stack.extend((item, steps + [f"[{i}]"]) for i, item in reversed(list(enumerate(node))))
        elif type(node) is dict:
            stack.extend((item, steps + [_key_step(k)]) for k, item in reversed(list(node.items())))
    return None


def _to_tree(value: Any, blobs: list[bytes], depth: int, placing: _Placing | None = None) -> Any:
    # Ordered by frequency: most values are plain JSON scalars.
    if value is None or value is True or value is False or type(value) is str or type(value) is int:
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        return {TAG: "float", "value": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise _ValueError(f"nested deeper than {MAX_DEPTH} levels")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _ValueError(f"map keys must be strings, got {type(key).__name__} key {_short_repr(key)}")
            try:
                out[key] = (item if type(item) in _PLAIN_JSON and _finite(item)
                            else _to_tree(item, blobs, depth + 1, placing))
            except _ValueError as exc:
                raise exc.at(_key_step(key))
        if TAG in out:
            return {TAG: "object", "value": out}
        return out
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise _ValueError(f"nested deeper than {MAX_DEPTH} levels")
        items = []
        for index, item in enumerate(value):
            try:
                items.append(item if type(item) in _PLAIN_JSON and _finite(item)
                             else _to_tree(item, blobs, depth + 1, placing))
            except _ValueError as exc:
                raise exc.at(f"[{index}]")
        return items
    if isinstance(value, (bytes, bytearray, memoryview)):
        if placing is not None and memoryview(value).nbytes >= placing.min_bytes:
            view = memoryview(value).cast("B") if memoryview(value).contiguous else memoryview(bytes(value))
            return {TAG: "bytes", "shm": placing.place(view), "offset": 0, "length": view.nbytes}
        blobs.append(bytes(value))
        return {TAG: "bytes", "blob": len(blobs) - 1}
    if isinstance(value, bool):  # numpy.bool_ is handled below; this is a bool subclass
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _to_tree(float(value), blobs, depth, placing)
    if isinstance(value, str):
        return str(value)
    np = _numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _ValueError("numpy arrays of dtype object cannot be encoded")
        array = np.asarray(value, order="C")  # ascontiguousarray would turn 0-d arrays into shape (1,)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if placing is not None and array.nbytes >= placing.min_bytes:
            name = placing.place(array.reshape(-1).view(np.uint8))  # C order: the raw buffer as it is
            return {TAG: "ndarray", "shm": name, "offset": 0, "dtype": array.dtype.str, "shape": list(array.shape)}
        blobs.append(memoryview(array) if type(blobs) is _BlobViews else array.tobytes())  # type: ignore[arg-type]
        return {TAG: "ndarray", "blob": len(blobs) - 1, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, np.generic):
        return _to_tree(value.item(), blobs, depth, placing)
    if isinstance(value, (set, frozenset)):
        return _to_tree(sorted(value, key=repr), blobs, depth, placing)
    raise _ValueError(f"cannot encode value of type {type(value).__name__}")


def _finite(item: Any) -> bool:
    return type(item) is not float or math.isfinite(item)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def decode(json_text: str, blobs: list[bytes] | tuple[bytes, ...] = (), *, field: str = "json",
           regions=None) -> Any:
    """Decode (JSON text, blobs) into Python values. Empty text decodes as None. Shared-memory regions
    (`"shm"` references) are opened in `regions` (an shm.RegionDir); without it they are an error."""
    if not json_text:
        return None
    if json_text == "{}":
        return {}
    try:
        tree = json.loads(json_text)
    except RecursionError:
        raise CodecError(f"{field}: nested deeper than {MAX_DEPTH} levels", field) from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            raise CodecError(f"{field}: has an integer of more than {limit} decimal digits, the interpreter's limit "
                             "(sys.get_int_max_str_digits(); raise it with PYTHONINTMAXSTRDIGITS)", field) from None
        raise CodecError(f"{field} is not valid JSON: {exc}", field) from None
    if type(tree) in _PLAIN_JSON:
        return tree
    try:
        return _from_tree(tree, blobs, 0, regions)
    except _ValueError as exc:
        raise exc.codec_error(field) from None


def _from_tree(tree: Any, blobs, depth: int, regions=None) -> Any:
    if type(tree) is list:
        if depth >= MAX_DEPTH:
            raise _ValueError(f"nested deeper than {MAX_DEPTH} levels")
        items = []
        for index, item in enumerate(tree):
            if type(item) in _PLAIN_JSON:
                items.append(item)  # Python's json accepts NaN/Infinity literals; they stay floats
                continue
            try:
                items.append(_from_tree(item, blobs, depth + 1, regions))
            except _ValueError as exc:
                raise exc.at(f"[{index}]")
        return items
    if type(tree) is not dict:
        return tree
    kind = tree.get(TAG)
    if kind is None:
        return _from_object(tree, blobs, depth, regions)
    if kind == "bytes":
        if "shm" in tree:
            return _region(regions, "bytes", tree.get("shm"), tree.get("offset", 0), None, tree.get("length"))
        return _blob(tree, blobs)
    if kind == "ndarray":
        return _ndarray(tree, blobs, regions)
    if kind == "float":
        text = tree.get("value")
        if text not in ("nan", "inf", "-inf"):
            raise _ValueError(f"float tag needs value 'nan', 'inf' or '-inf', got {_short_repr(text)}")
        return float(text)
    if kind == "object":
        inner = tree.get("value")
        if type(inner) is not dict:
            raise _ValueError("object tag needs a JSON object as value")
        return _from_object(inner, blobs, depth, regions)
    raise _ValueError(f"unknown {TAG} tag {_short_repr(kind)}")


def _from_object(tree: dict, blobs, depth: int, regions=None) -> dict:
    if depth >= MAX_DEPTH:
        raise _ValueError(f"nested deeper than {MAX_DEPTH} levels")
    out = {}
    for key, item in tree.items():
        if type(item) in _PLAIN_JSON:
            out[key] = item
            continue
        try:
            out[key] = _from_tree(item, blobs, depth + 1, regions)
        except _ValueError as exc:
            raise exc.at(_key_step(key))
    return out


def _blob(tree: dict, blobs) -> bytes:
    return bytes(_blob_buffer(tree, blobs))


def _blob_buffer(tree: dict, blobs):
    """The blob a tag names, as it is: bytes, or a memoryview into a received message (wire.split)."""
    index = tree.get("blob")
    if type(index) is not int or not 0 <= index < len(blobs):
        raise _ValueError(f"blob index {_short_repr(index)} out of range (have {len(blobs)} blobs)")
    return blobs[index]


def _ndarray(tree: dict, blobs, regions=None):
    np = _numpy()
    dtype = _plain_dtype(np, tree.get("dtype"))
    shape = tree.get("shape")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _ValueError(f"ndarray shape must be a list of non-negative integers, got {_short_repr(shape)}")
    if len(shape) > MAX_NDIM:
        raise _ValueError(f"ndarray has {len(shape)} dimensions, more than the {MAX_NDIM} numpy allows")
    # numpy refuses shapes whose element count (zero-length axes left out) overflows its index type.
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2 ** 63:
        raise _ValueError(f"ndarray shape {_short_repr(shape)} of dtype {dtype.str} is too large to exist")
    if "shm" in tree:
        return _region(regions, "ndarray", tree.get("shm"), tree.get("offset", 0), (dtype, shape), None)
    data = _blob_buffer(tree, blobs)
    expected = dtype.itemsize * math.prod(shape)
    if expected != len(data):
        raise _ValueError(f"ndarray of dtype {dtype.str} and shape {shape} needs {expected} bytes, "
                          f"blob has {len(data)}")
    # bytearray makes the array writable; frombuffer over bytes would be read-only.
    return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _region(regions, kind: str, name: Any, offset: Any, array: tuple | None, length: Any):
    """A shared-memory region's bytes or array (shm.RegionDir), or the error that names why not."""
    if regions is None:
        raise _ValueError(f"{kind} in shared-memory region {_short_repr(name)}: this side takes no regions "
                          "(a worker started without --shm-dir, a client without shm_dir)")
    from .shm import RegionError

    try:
        if array is None:
            return regions.open_bytes(name, offset, length)
        return regions.open_array(name, offset, *array)
    except RegionError as exc:
        raise _ValueError(str(exc)) from None


def _plain_dtype(np, dtype_text: Any):
    """The numpy dtype for an array-interface string, refusing anything that is not a plain,
    non-empty scalar item (objects, fields, sub-arrays): what `encode` writes, and nothing else."""
    if type(dtype_text) is not str or not dtype_text or len(dtype_text) > _MAX_DTYPE_TEXT:
        raise _ValueError(f"ndarray dtype must be a numpy type string such as '<f8', got {_short_repr(dtype_text)}")
    try:
        dtype = np.dtype(dtype_text)
    except Exception:  # numpy raises TypeError, ValueError or SyntaxError for text it cannot parse
        raise _ValueError(f"unknown ndarray dtype {_short_repr(dtype_text)}") from None
    if dtype.hasobject:
        raise _ValueError(f"ndarray dtype {_short_repr(dtype_text)} holds Python objects")
    if dtype.names is not None or dtype.subdtype is not None:
        raise _ValueError(f"ndarray dtype {_short_repr(dtype_text)} is structured or has a sub-array; "
                          "send each field as its own array")
    if dtype.itemsize == 0:
        raise _ValueError(f"ndarray dtype {_short_repr(dtype_text)} has items of zero bytes")
    return dtype
