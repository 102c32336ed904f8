"""The real grpcurl binary, with no proto files (server reflection), calls every RPC with readable JSON."""
from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest

from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SPEC_ADAPTER, WorkerServer

pytestmark = pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")

SERVICE = "snakepit.bridge.BridgeService"
ALL_METHODS = ["Ping", "DescribeTools", "ExecuteTool", "ExecuteStreamingTool", "ExecuteBatch", "InitializeSession",
               "GetSession", "CleanupSession", "Heartbeat", "GetStats"]


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SPEC_ADAPTER) as server:
        yield server


def call(server, method, data: dict | None = None, service=SERVICE, expect_ok=True, flags=()):
    result = server.grpcurl(f"{service}/{method}", data=json.dumps(data or {}), flags=flags)
    if expect_ok:
        assert result.returncode == 0, result.stderr
    return result


def messages(stdout: str) -> list[dict]:
    """grpcurl prints one pretty JSON object per response message."""
    decoder, out, index = json.JSONDecoder(), [], 0
    text = stdout.strip()
    while index < len(text):
        obj, index = decoder.raw_decode(text, index)
        out.append(obj)
        while index < len(text) and text[index].isspace():
            index += 1
    return out


def execute(server, tool, args: dict | None = None, blobs=(), **fields) -> dict:
    data = {"tool_name": tool, "args_json": json.dumps(args or {}),
            "blobs": [base64.b64encode(b).decode() for b in blobs], **fields}
    return messages(call(server, "ExecuteTool", data).stdout)[0]


# --- reflection and health ----------------------------------------------------------------------------

def test_list_shows_the_bridge_health_and_reflection_services(server):
    result = server.grpcurl("list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_list_of_the_service_shows_every_method(server):
    result = server.grpcurl("list", SERVICE)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(f"{SERVICE}.{m}" for m in ALL_METHODS)


def test_describe_shows_the_service_and_message_definitions(server):
    service = server.grpcurl("describe", SERVICE)
    assert service.returncode == 0 and "rpc ExecuteStreamingTool" in service.stdout
    assert "returns ( stream .snakepit.bridge.ToolChunk )" in service.stdout
    message = server.grpcurl("describe", "snakepit.bridge.ExecuteToolRequest")
    assert message.returncode == 0
    for field in ("string tool_name = 1", "string args_json = 2", "repeated bytes blobs = 3", "uint64 seed = 7"):
        assert field in message.stdout, message.stdout


def test_health_check_answers_serving_for_the_server_and_the_bridge_service(server):
    for service in ("", SERVICE):
        result = call(server, "Check", {"service": service}, service="grpc.health.v1.Health")
        assert messages(result.stdout) == [{"status": "SERVING"}]
    unknown = call(server, "Check", {"service": "no.such.Service"}, service="grpc.health.v1.Health", expect_ok=False)
    assert unknown.returncode == 64 + 5 and "NotFound" in unknown.stderr


# --- every RPC ------------------------------------------------------------------------------------------

def test_ping(server):
    response = messages(call(server, "Ping", {"message": "hi"}).stdout)[0]
    assert response["message"] == "hi" and response["pid"] == server.pid
    assert response["worker_mode"] == server.mode and response["adapter"] == SPEC_ADAPTER


def test_describe_tools(server):
    response = messages(call(server, "DescribeTools").stdout)[0]
    tools = {t["name"]: t for t in response["tools"]}
    assert "typed" in tools and tools["countdown"]["supports_streaming"] is True
    assert [p["name"] for p in tools["typed"]["parameters"]][:3] == ["i", "f", "flag"]


def test_execute_tool_with_readable_json_arguments(server):
    response = execute(server, "context_info", {}, request_id="curl-1", metadata={"k": "v"})
    result = json.loads(response["result_json"])
    assert result["request_id"] == "curl-1" and result["metadata"] == {"k": "v"}
    assert response["request_id"] == "curl-1" and response["duration_ms"] >= 0


def test_execute_streaming_tool(server):
    result = call(server, "ExecuteStreamingTool", {"tool_name": "countdown", "args_json": '{"n": 3}'})
    chunks = messages(result.stdout)
    assert [json.loads(c["data_json"]) for c in chunks] == [0, 1, 2, "done"]
    assert [c.get("is_final", False) for c in chunks] == [False, False, False, True]
    assert [int(c.get("sequence", 0)) for c in chunks] == [0, 1, 2, 3]


def test_execute_batch(server):
    with WorkerServer(server.mode, "--adapter", "snakepit_bridge.adapters.showcase.ShowcaseAdapter") as showcase:
        items = [{"args_json": json.dumps({"a": a, "b": 10})} for a in (1, 2)] + [{"args_json": '{"a": 1}'}]
        result = call(showcase, "ExecuteBatch", {"tool_name": "add", "items": items})
    response = messages(result.stdout)[0]
    results = response["results"]
    assert [json.loads(r["result_json"]) for r in results[:2]] == [11, 12]
    assert results[0]["ok"] is True and results[2].get("ok", False) is False
    assert "'b'" in results[2]["error"]["message"]


def test_session_rpcs(server):
    created = messages(call(server, "InitializeSession", {"session_id": "curl-s", "state_json": '{"n": 1}',
                                                          "ttl_seconds": 60}).stdout)[0]
    assert created["session_id"] == "curl-s" and created["created"] is True and created["ttl_seconds"] == 60
    execute(server, "session_put", {"key": "m", "value": [1, 2]}, session_id="curl-s")
    state = messages(call(server, "GetSession", {"session_id": "curl-s"}).stdout)[0]
    assert json.loads(state["state_json"]) == {"n": 1, "m": [1, 2]}
    beat = messages(call(server, "Heartbeat", {"session_id": "curl-s"}).stdout)[0]
    assert beat["serving"] is True and beat["session_alive"] is True
    cleaned = messages(call(server, "CleanupSession", {"session_id": "curl-s"}).stdout)[0]
    assert cleaned == {"existed": True}
    gone = call(server, "GetSession", {"session_id": "curl-s"}, expect_ok=False)
    assert gone.returncode == 64 + 5 and "curl-s" in gone.stderr


def test_get_stats(server):
    execute(server, "noop")
    stats = messages(call(server, "GetStats").stdout)[0]
    assert stats["worker_mode"] == server.mode and stats["pid"] == server.pid
    assert int(stats["requests_total"]) >= 1
    assert stats["max_workers"] == (16 if server.mode == "threaded" else 1)
    assert any(t["name"] == "noop" for t in stats["tools"])


# --- values through grpcurl ------------------------------------------------------------------------

def test_every_value_type_round_trips_through_grpcurl_json(server):
    array = np.arange(6, dtype="<i8").reshape(2, 3)
    args = {
        "i": 2**63 - 1, "f": 2.5, "flag": True, "s": "héllo ✓", "ints": [1, -2, 3], "maybe": None,
        "mapping": {"nested": {"list": [1, 2.0, None, "x"]}, "three": 3, "three_float": 3.0},
        "raw": {"__snakepit__": "bytes", "blob": 0},
        "arr": {"__snakepit__": "ndarray", "blob": 1, "dtype": "<i8", "shape": [2, 3]},
    }
    raw = bytes(range(256))
    response = execute(server, "typed", args, blobs=[raw, array.tobytes()])
    result_json = response["result_json"]
    result = json.loads(result_json)
    assert result["types"] == {"i": "int", "f": "float", "flag": "bool", "s": "str", "raw": "bytes", "ints": "list",
                               "mapping": "dict", "arr": "ndarray", "maybe": "NoneType"}
    values = result["values"]
    assert values["i"] == 2**63 - 1 and type(values["i"]) is int
    assert values["mapping"] == {"nested": {"list": [1, 2.0, None, "x"]}, "three": 3, "three_float": 3.0}
    assert type(values["mapping"]["three"]) is int and type(values["mapping"]["three_float"]) is float
    assert '"three":3,' in result_json or '"three":3}' in result_json
    blobs = [base64.b64decode(b) for b in response["blobs"]]
    assert blobs[values["raw"]["blob"]] == raw
    arr = values["arr"]
    assert arr["dtype"] == "<i8" and arr["shape"] == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(blobs[arr["blob"]], dtype="<i8").reshape(2, 3), array)


# --- errors through grpcurl ----------------------------------------------------------------------------

@pytest.mark.parametrize("data, code, name, words", [
    ({"tool_name": "no_such_tool"}, 5, "NotFound", ["no_such_tool"]),
    ({"tool_name": "_private_tool"}, 5, "NotFound", ["_private_tool"]),
    ({"tool_name": "unmarked"}, 5, "NotFound", ["unmarked"]),
    ({"tool_name": "typed", "args_json": '{"i": 1}'}, 3, "InvalidArgument", ["missing", "'f'"]),
    ({"tool_name": "noop", "args_json": '{"extra": 1}'}, 3, "InvalidArgument", ["'extra'"]),
    ({"tool_name": "make_bytes", "args_json": '{"size": "big"}'}, 3, "InvalidArgument", ["'size'"]),
    ({"tool_name": "noop", "args_json": "{oops"}, 3, "InvalidArgument", ["args_json"]),
    ({"tool_name": "countdown", "args_json": '{"n": 1}'}, 9, "FailedPrecondition", ["countdown"]),
    ({"tool_name": "raise_tool_error", "args_json": '{"code": "ABORTED", "message": "nope"}'}, 10, "Aborted",
     ["nope"]),
])
def test_bad_calls_fail_with_the_status_and_a_message_naming_the_problem(server, data, code, name, words):
    result = call(server, "ExecuteTool", data, expect_ok=False)
    assert result.returncode == 64 + code, (result.returncode, result.stderr)
    assert f"Code: {name}" in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_tool_exception_trailer_is_visible_to_grpcurl(server):
    result = call(server, "ExecuteStreamingTool", {"tool_name": "stream_then_fail", "args_json": '{"before": 1}'},
                  expect_ok=False, flags=["-v"])
    assert result.returncode == 64 + 2 and "Code: Unknown" in result.stderr
    assert "RuntimeError" in result.stderr
    trailer_lines = [line for line in result.stdout.splitlines() if line.startswith("snakepit-error-bin:")]
    assert len(trailer_lines) == 1, result.stdout
    error = pb.ToolError.FromString(base64.b64decode(trailer_lines[0].split(":", 1)[1].strip() + "=="))
    assert error.type == "RuntimeError" and "after 1 chunks" in error.message and "Traceback" in error.traceback
