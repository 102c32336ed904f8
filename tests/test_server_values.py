"""Values come back exactly as they were sent, on both servers, and binary data travels as raw bytes.

The Python client encodes with snakepit_bridge.codec; the wire-level tests read the raw protobuf
messages, so they catch a server that (say) turned 3 into 3.0 or shipped an array as a JSON list.
"""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from snakepit_bridge import codec
from snakepit_bridge.server import codec as server_codec
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SHOWCASE, WorkerServer


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SHOWCASE) as server:
        yield server


@pytest.fixture(scope="module")
def spec_server(spec_threaded):
    return spec_threaded


def assert_identical(sent, got, path="$"):
    """Same value and same type, all the way down (NaN equals NaN, -0.0 is not 0.0)."""
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: sent an ndarray, got {type(got).__name__}"
        assert got.shape == sent.shape, f"{path}: shape {sent.shape} came back as {got.shape}"
        assert got.dtype.kind == sent.dtype.kind and got.dtype.itemsize == sent.dtype.itemsize, (
            f"{path}: dtype {sent.dtype.str} came back as {got.dtype.str}")
        assert got.dtype == sent.dtype.newbyteorder("<") or got.dtype == sent.dtype, path
        assert np.array_equal(sent, got, equal_nan=sent.dtype.kind in "fc"), f"{path}: array values differ"
        return
    assert type(got) is type(sent), f"{path}: sent {type(sent).__name__} {sent!r}, got {type(got).__name__} {got!r}"
    if isinstance(sent, float):
        if math.isnan(sent):
            assert math.isnan(got), path
        else:
            assert got == sent and math.copysign(1.0, got) == math.copysign(1.0, sent), f"{path}: {sent!r} != {got!r}"
    elif isinstance(sent, dict):
        assert list(got) == list(sent), f"{path}: keys {list(sent)} came back as {list(got)}"
        for key in sent:
            assert_identical(sent[key], got[key], f"{path}.{key}")
    elif isinstance(sent, list):
        assert len(got) == len(sent), f"{path}: length {len(sent)} came back as {len(got)}"
        for index, (a, b) in enumerate(zip(sent, got)):
            assert_identical(a, b, f"{path}[{index}]")
    else:
        assert got == sent, f"{path}: {sent!r} came back as {got!r}"


SCALARS = {
    "int64_max": 2**63 - 1,
    "int64_min": -(2**63),
    "zero": 0,
    "small_int": 3,
    "int_beyond_64_bits": 2**100 + 1,
    "float_with_zero_fraction": 3.0,
    "float": 0.1,
    "negative_zero": -0.0,
    "subnormal": 5e-324,
    "largest_float": 1.7976931348623157e308,
    "nan": float("nan"),
    "inf": float("inf"),
    "minus_inf": float("-inf"),
    "true": True,
    "false": False,
    "null": None,
    "empty_string": "",
    "unicode_string": "héllo ✓ 🐍 \u0000 \"quoted\" \\ back",
    "empty_bytes": b"",
    "all_byte_values": bytes(range(256)),
    "empty_list": [],
    "empty_map": {},
    "nested": {"a": [1, 2.5, {"b": [None, True, "x", b"\x00\xff"]}], "c": {"d": {"e": []}}},
    "map_with_reserved_tag_key": {"__snakepit__": "bytes", "blob": 0},
}


@pytest.mark.parametrize("name", list(SCALARS))
def test_value_round_trips_unchanged_through_echo(server, name):
    value = SCALARS[name]
    got = server.client().execute("echo", {"value": value})
    assert_identical({"value": value}, got)


ARRAYS = {
    "float64_2x3": np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
    "float32_with_nan": np.array([1.5, np.nan, -np.inf], dtype=np.float32),
    "float16": np.array([0.5, 1.25], dtype=np.float16),
    "int64_extremes": np.array([np.iinfo(np.int64).min, 0, np.iinfo(np.int64).max], dtype=np.int64),
    "int32": np.arange(-3, 3, dtype=np.int32),
    "int8": np.array([-128, 127], dtype=np.int8),
    "uint8_image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "uint64_max": np.array([np.iinfo(np.uint64).max], dtype=np.uint64),
    "bool": np.array([True, False, True]),
    "complex128": np.array([1 + 2j, -3.5j]),
    "zero_dimensional": np.array(42.0),
    "empty_0x3": np.zeros((0, 3), dtype=np.int16),
    "non_contiguous_transpose": np.arange(12, dtype=np.float64).reshape(3, 4).T,
    "big_endian": np.array([1.0, 2.0, 3.0], dtype=">f8"),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_numpy_array_round_trips_with_dtype_and_shape(server, name):
    array = ARRAYS[name]
    got = server.client().execute("echo", {"array": array})["array"]
    assert_identical(array, got)


def test_mixed_tree_of_every_type_round_trips_in_one_call(server):
    tree = {**SCALARS, "arrays": list(ARRAYS.values()), "blobs": [b"one", b"two", b"one"]}
    got = server.client().execute("echo", tree)
    assert_identical(tree, got)


def raw_execute(server, tool, args_json="", blobs=()):
    return server.stub().ExecuteTool(pb.ExecuteToolRequest(tool_name=tool, args_json=args_json, blobs=list(blobs)),
                                     timeout=30)


def test_integers_stay_integers_in_the_result_json(server):
    response = raw_execute(server, "echo", '{"three": 3, "max": 9223372036854775807, "min": -9223372036854775808, '
                                           '"float_three": 3.0}')
    assert '"three":3,' in response.result_json or '"three":3}' in response.result_json, response.result_json
    assert "9223372036854775807" in response.result_json and "-9223372036854775808" in response.result_json
    assert "3.0" in response.result_json  # a float with a zero fraction keeps it
    decoded = json.loads(response.result_json)
    assert type(decoded["three"]) is int and type(decoded["float_three"]) is float
    assert decoded["max"] == 2**63 - 1 and decoded["min"] == -(2**63)


def test_add_keeps_integer_results_integers_and_float_results_floats(server):
    client = server.client()
    assert_identical(5, client.execute("add", {"a": 2, "b": 3}))
    assert_identical(3.0, client.execute("add", {"a": 2.5, "b": 0.5}))
    assert_identical(2**63, client.execute("add", {"a": 2**63 - 1, "b": 1}))  # past int64: still an exact int


def test_bytes_travel_as_raw_blobs_not_base64_or_json_lists(server):
    payload = bytes(range(256)) * 4
    args_json, blobs = codec.encode({"data": payload})
    assert blobs == [payload] and base64.b64encode(payload).decode() not in args_json
    response = raw_execute(server, "echo", args_json, blobs)
    assert list(response.blobs) == [payload]
    assert json.loads(response.result_json) == {"data": {"__snakepit__": "bytes", "blob": 0}}
    assert len(response.result_json) < 100  # the JSON only references the blob


def test_ndarray_travels_as_its_raw_buffer_with_dtype_and_shape(server):
    array = np.arange(6, dtype=np.float64).reshape(2, 3) + 0.25
    args_json, blobs = codec.encode({"m": array})
    response = raw_execute(server, "echo", args_json, blobs)
    assert list(response.blobs) == [array.tobytes()]
    assert json.loads(response.result_json) == {
        "m": {"__snakepit__": "ndarray", "blob": 0, "dtype": "<f8", "shape": [2, 3]}}


def test_hand_written_json_arguments_work_without_the_python_codec(server):
    """What grpcurl or any other gRPC client sends: plain JSON text, blobs referenced by index."""
    response = raw_execute(server, "array_stats",
                           '{"values": {"__snakepit__": "ndarray", "blob": 0, "dtype": "<i4", "shape": [4]}}',
                           [np.array([1, 2, 3, 4], dtype="<i4").tobytes()])
    result = codec.decode(response.result_json, response.blobs)
    assert result["mean"] == 2.5 and result["shape"] == [4] and result["min"] == 1.0 and result["max"] == 4.0
    np.testing.assert_allclose(result["normalized"], (np.arange(1, 5) - 2.5) / np.std(np.arange(1, 5)))


def test_ndarray_tools_compute_on_arrays_sent_as_arrays(server):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = server.client().execute("matmul", {"a": a, "b": b})
    assert_identical(a @ b, got)


def test_typed_parameters_receive_native_python_types(spec_server):
    array = np.eye(2, dtype=np.int16)
    got = spec_server.client().execute("typed", {
        "i": 2**63 - 1, "f": 2.5, "flag": False, "s": "text", "raw": b"\x00\x01", "ints": [1, 2, 3],
        "mapping": {"k": [1, None]}, "arr": array})
    assert got["types"] == {"i": "int", "f": "float", "flag": "bool", "s": "str", "raw": "bytes", "ints": "list",
                            "mapping": "dict", "arr": "ndarray", "maybe": "NoneType"}
    assert_identical({"i": 2**63 - 1, "f": 2.5, "flag": False, "s": "text", "raw": b"\x00\x01", "ints": [1, 2, 3],
                      "mapping": {"k": [1, None]}, "arr": array, "maybe": None}, got["values"])


def test_float_parameter_accepts_an_integer_and_ndarray_parameter_accepts_a_list(spec_server):
    got = spec_server.client().execute("typed", {
        "i": 1, "f": 3, "flag": True, "s": "", "raw": b"", "ints": [], "mapping": {}, "arr": [[1.5, 2.5]],
        "maybe": 7})
    assert got["types"]["f"] == "float" and got["values"]["f"] == 3.0
    assert got["types"]["arr"] == "ndarray" and got["values"]["arr"].shape == (1, 2)
    assert got["values"]["maybe"] == 7


def test_streamed_chunks_carry_values_of_every_type(server):
    chunks = []
    stream = server.client().stream("progress", {"steps": 3})
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as stop:
            final = stop.value
            break
    assert chunks == [{"step": 1, "total": 3, "percent": 33.3}, {"step": 2, "total": 3, "percent": 66.7},
                      {"step": 3, "total": 3, "percent": 100.0}]
    assert_identical({"completed": 3, "cancelled": False}, final)


# --- property: any value tree comes back identical ----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

ARRAY_DTYPES = ["<i8", "<i4", "|i1", "|u1", "<u8", "<f8", "<f4", "<f2", "|b1", "<c16"]
arrays = st.sampled_from(ARRAY_DTYPES).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.binary(max_size=40) | arrays)
trees = st.recursive(leaves, lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=12) | st.just("__snakepit__"), children, max_size=4),
                     max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=trees)
def test_any_value_tree_round_trips_unchanged(spec_threaded, value):
    got = spec_threaded.client().execute("typed", {"i": 0, "f": 0.0, "flag": False, "s": "", "raw": b"", "ints": [],
                                                   "mapping": {"v": value}, "arr": []})
    assert_identical({"v": value}, got["values"]["mapping"])


json_trees = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12).filter(lambda key: key != server_codec.TAG), children, max_size=4),
    max_leaves=12)  # plain: a dict with the codec's reserved key is escaped (a tagged object), not plain JSON


@settings(max_examples=300, deadline=None)
@given(value=json_trees)
def test_result_json_text_is_what_json_dumps_writes_for_plain_values(value):
    # The server reuses one C encoder object instead of building one per call: its text must not
    # differ from json's own (non-ASCII kept, lone surrogates escaped).
    text, blobs = server_codec.encode(value)
    try:
        expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        expected.encode("utf-8")
    except UnicodeEncodeError:
        expected = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    assert (text, blobs) == (expected, [])
