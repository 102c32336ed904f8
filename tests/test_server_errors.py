"""Bad calls fail with the right status and a message naming what was wrong; the server keeps serving."""
from __future__ import annotations

import json
import os
import pickle

import grpc
import numpy as np
import pytest

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SPEC_ADAPTER, WorkerServer


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SPEC_ADAPTER) as server:
        yield server


def call_error(server, tool, args=None, **kwargs) -> BridgeCallError:
    with pytest.raises(BridgeCallError) as caught:
        server.client().execute(tool, args, **kwargs)
    return caught.value


def raw_error(server, tool, args_json="", blobs=(), streaming=False) -> grpc.RpcError:
    stub = server.stub()
    request = pb.ExecuteToolRequest(tool_name=tool, args_json=args_json, blobs=list(blobs))
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(stub.ExecuteStreamingTool(request, timeout=30))
        else:
            stub.ExecuteTool(request, timeout=30)
    return caught.value


def assert_still_serving(server):
    assert server.client().execute("noop") is None
    assert server.process.poll() is None


# --- what is callable --------------------------------------------------------------------------

def test_unknown_tool_is_not_found_naming_the_tool(server):
    error = call_error(server, "no_such_tool")
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert "no_such_tool" in error.message


@pytest.mark.parametrize("name", ["_private_tool", "unmarked", "setup", "teardown", "bind_server", "__init__",
                                  "tool_specs", "__class__"])
def test_private_unmarked_and_lifecycle_methods_are_not_found(server, name):
    error = call_error(server, name)
    assert error.code == grpc.StatusCode.NOT_FOUND, error
    assert name in error.message


def test_describe_tools_lists_marked_public_methods_only(server):
    names = {t.name for t in server.client().describe_tools().tools}
    assert {"noop", "typed", "context_info", "countdown", "stream_then_fail"} <= names
    assert not names & {"_private_tool", "unmarked", "setup", "teardown", "bind_server", "tool_specs"}


def test_empty_tool_name_is_invalid_argument(server):
    error = raw_error(server, "")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool_name" in error.details()


# --- arguments ------------------------------------------------------------------------------------

GOOD_TYPED = {"i": 1, "f": 1.0, "flag": True, "s": "s", "raw": b"r", "ints": [1], "mapping": {}, "arr": [1.0]}


def test_missing_argument_is_invalid_argument_naming_the_parameter(server):
    args = dict(GOOD_TYPED)
    del args["flag"]
    error = call_error(server, "typed", args)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'flag'" in error.message and "missing" in error.message


def test_unknown_argument_is_invalid_argument_naming_it(server):
    error = call_error(server, "typed", {**GOOD_TYPED, "colour": "blue"})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'colour'" in error.message and "unknown" in error.message


@pytest.mark.parametrize("parameter, bad_value", [
    ("i", "3"),            # a string is not an int
    ("i", 3.0),            # nor is a float with a zero fraction
    ("i", True),           # nor is a boolean
    ("f", "1.5"),
    ("flag", 1),
    ("flag", None),
    ("s", 5),
    ("raw", "not bytes"),
    ("ints", [1, "two"]),
    ("ints", {"a": 1}),
    ("mapping", [1, 2]),
    ("arr", "abc"),
    ("arr", [[1, 2], [3]]),
    ("maybe", "x"),
])
def test_wrongly_typed_argument_is_invalid_argument_naming_the_parameter(server, parameter, bad_value):
    error = call_error(server, "typed", {**GOOD_TYPED, parameter: bad_value})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"'{parameter}'" in error.message, error.message


def test_invalid_argument_carries_no_traceback_and_the_tool_did_not_run(server):
    before = {t.name: t.calls for t in server.client().stats().tools}.get("typed", 0)
    error = call_error(server, "typed", {**GOOD_TYPED, "i": "x"})
    assert error.tool_error is None or error.tool_error.traceback == ""
    after = {t.name: t.calls for t in server.client().stats().tools}.get("typed", 0)
    assert after == before


def test_arguments_that_are_not_json_are_invalid_argument(server):
    error = raw_error(server, "noop", "{not json")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "args_json" in error.details()


def test_arguments_that_are_not_a_json_object_are_invalid_argument(server):
    error = raw_error(server, "noop", "[1, 2]")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "args_json" in error.details()


@pytest.mark.parametrize("args_json, blobs, words", [
    ('{"i": {"__snakepit__": "bytes", "blob": 3}}', [], ["blob", "3"]),
    ('{"i": {"__snakepit__": "pickle", "value": "gASVAAAAAAAAAAA="}}', [], ["pickle"]),
    ('{"a": {"__snakepit__": "ndarray", "blob": 0, "dtype": "<f8", "shape": [3]}}', [b"\x00" * 16], ["24", "16"]),
    ('{"a": {"__snakepit__": "ndarray", "blob": 0, "dtype": "|O", "shape": [1]}}', [b"\x00" * 8], ["|O"]),
    ('{"a": {"__snakepit__": "ndarray", "blob": 0, "dtype": "nonsense", "shape": [1]}}', [b"\x00" * 8], ["nonsense"]),
    ('{"a": {"__snakepit__": "float", "value": "1.5"}}', [], ["float"]),
])
def test_malformed_tagged_values_are_invalid_argument_naming_the_field(server, args_json, blobs, words):
    error = raw_error(server, "noop", args_json, blobs)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert "args_json" in error.details()


class _WritesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_server_never_unpickles_request_bytes(server, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_WritesAFileWhenUnpickled(str(marker)))
    client = server.client()
    assert client.execute("typed", {**GOOD_TYPED, "raw": payload})["values"]["raw"] == payload
    response = server.stub().ExecuteTool(pb.ExecuteToolRequest(
        tool_name="noop", args_json="{}", blobs=[payload]), timeout=30)
    assert response.result_json == "null"
    assert not marker.exists() and not os.path.exists(str(marker))


# --- streaming / non-streaming mismatch -------------------------------------------------------------

def test_streaming_tool_through_execute_tool_is_failed_precondition(server):
    error = call_error(server, "countdown", {"n": 2})
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "countdown" in error.message


def test_plain_tool_through_execute_streaming_tool_is_failed_precondition(server):
    with pytest.raises(BridgeCallError) as caught:
        list(server.client().stream("noop"))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "noop" in caught.value.message


# --- tools that raise -------------------------------------------------------------------------------

def tool_error_of(error: grpc.RpcError) -> pb.ToolError:
    trailers = dict(error.trailing_metadata() or ())
    assert "snakepit-error-bin" in trailers, f"no snakepit-error-bin trailer in {list(trailers)}"
    return pb.ToolError.FromString(trailers["snakepit-error-bin"])


def test_raising_tool_returns_unknown_with_type_message_and_traceback_trailer(server):
    with WorkerServer(server.mode, "--adapter", "snakepit_bridge.adapters.showcase.ShowcaseAdapter") as showcase:
        error = raw_error(showcase, "fail", json.dumps({"message": "boom 42", "kind": "ZeroDivisionError"}))
        assert error.code() == grpc.StatusCode.UNKNOWN
        assert "ZeroDivisionError" in error.details() and "boom 42" in error.details()
        tool_error = tool_error_of(error)
        assert tool_error.type == "ZeroDivisionError"
        assert tool_error.message == "boom 42"
        assert tool_error.tool_name == "fail"
        assert tool_error.code == grpc.StatusCode.UNKNOWN.value[0]
        assert "Traceback" in tool_error.traceback and "in fail" in tool_error.traceback
        assert "showcase.py" in tool_error.traceback
        assert showcase.client().execute("add", {"a": 1, "b": 1}) == 2  # keeps serving


def test_python_client_exposes_the_tool_error(server):
    error = call_error(server, "raise_tool_error", {"code": "OUT_OF_RANGE", "message": "too far"})
    assert error.code == grpc.StatusCode.OUT_OF_RANGE and "too far" in error.message
    assert error.tool_error is not None and error.tool_error.type == "ToolError"
    assert error.tool_error.message == "too far" and error.tool_error.tool_name == "raise_tool_error"


def test_result_that_cannot_be_encoded_is_internal_and_the_server_keeps_serving(server):
    error = call_error(server, "unencodable")
    assert error.code == grpc.StatusCode.INTERNAL  # the tool ran, but its result cannot be encoded
    assert "unencodable" in error.message and "object" in error.message
    assert_still_serving(server)


@pytest.mark.parametrize("code", ["FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "NOT_FOUND"])
def test_tool_error_chooses_the_status_code_and_keeps_the_trailer(server, code):
    error = raw_error(server, "raise_tool_error", json.dumps({"code": code, "message": "chosen"}))
    assert error.code() == grpc.StatusCode[code]
    tool_error = tool_error_of(error)
    assert tool_error.type == "ToolError" and tool_error.message == "chosen"
    assert tool_error.code == grpc.StatusCode[code].value[0] and tool_error.tool_name == "raise_tool_error"
    assert "raise_tool_error" in tool_error.traceback


def test_streaming_tool_that_raises_sends_its_chunks_then_a_structured_error(server):
    stub = server.stub()
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for chunk in stub.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="stream_then_fail",
                                                                     args_json='{"before": 3}'), timeout=30):
            received.append(json.loads(chunk.data_json))
    assert received == [0, 1, 2]
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    tool_error = tool_error_of(caught.value)
    assert tool_error.type == "RuntimeError" and "after 3 chunks" in tool_error.message
    assert "stream_then_fail" in tool_error.traceback
    assert_still_serving(server)


def test_failures_are_counted_in_stats_and_the_server_keeps_serving(server):
    client = server.client()
    before = client.stats()
    for _ in range(5):
        call_error(server, "raise_tool_error", {"code": "ABORTED"})
    after = client.stats()
    assert after.requests_failed - before.requests_failed == 5
    rows = {t.name: t for t in after.tools}
    assert rows["raise_tool_error"].failures >= 5
    assert_still_serving(server)


def test_session_id_that_does_not_exist_is_not_found(server):
    error = call_error(server, "context_info", session_id="never-created")
    assert error.code == grpc.StatusCode.NOT_FOUND and "never-created" in error.message


def test_malformed_session_id_is_invalid_argument(server):
    error = call_error(server, "context_info", session_id="bad id with spaces/")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in error.message


def test_unencodable_array_dtype_in_request_json_is_refused_without_running_the_tool(server):
    array = np.zeros(2)
    error = raw_error(server, "typed", json.dumps({**{k: v for k, v in GOOD_TYPED.items() if k not in ("raw", "arr")},
                                                    "raw": {"__snakepit__": "bytes", "blob": 0},
                                                    "arr": {"__snakepit__": "ndarray", "blob": 1, "dtype": "<f8",
                                                            "shape": [3]}}),
                      [b"r", array.tobytes()])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "arr" in error.details()


def test_unpaired_surrogate_escape_round_trips_or_is_invalid_argument_never_an_unhandled_exception(server):
    """`"\\ud800"` is valid JSON text (and the wire bytes are valid UTF-8), but the string it decodes to
    cannot be written back as UTF-8: the server must either return it escaped or refuse it up front."""
    stub = server.stub()
    try:
        args = {**GOOD_TYPED, "raw": {"__snakepit__": "bytes", "blob": 0}, "s": "\ud800"}
        args_json = json.dumps(args)  # ensure_ascii: the surrogate travels as the escape \ud800
        assert "\\ud800" in args_json
        response = stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="typed", args_json=args_json, blobs=[b"r"]),
                                    timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert "args_json" in error.details() or "'s'" in error.details()
    else:
        assert json.loads(response.result_json)["values"]["s"] == "\ud800"
    assert_still_serving(server)
