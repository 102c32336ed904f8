"""Inputs an attacker (or a buggy client) sends: each ends at once with the right status and a message
naming the field, nothing hangs, and no client can hold the server's tool slots for the others."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest

from snakepit_bridge import codec
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.raw_h2 import RawGrpcConnection
from tests.servers import SHOWCASE, SPEC_ADAPTER, WorkerServer, cpu_seconds, proc_status_mb

SERVICE = "/snakepit.bridge.BridgeService/"
QUICK = 2.0  # seconds: every refusal below must come back well within this


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    """Each SpecAdapter server of conftest.py in turn."""
    return request.getfixturevalue(f"spec_{request.param}")


@pytest.fixture(scope="module")
def threaded(spec_threaded):
    return spec_threaded


def execute_raw(server, tool: str, args_json: str = "", *, blobs=(), timeout: float = 10.0, **fields):
    """ExecuteTool through a raw stub: (status code, details, seconds taken)."""
    request = pb.ExecuteToolRequest(tool_name=tool, args_json=args_json, blobs=list(blobs), **fields)
    started = time.monotonic()
    try:
        server.stub().ExecuteTool(request, timeout=timeout)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    return code, details, time.monotonic() - started


def batch_raw(server, tool: str, items_json: list[str], timeout: float = 10.0) -> pb.ExecuteBatchResponse:
    request = pb.ExecuteBatchRequest(tool_name=tool, items=[pb.BatchItem(args_json=a) for a in items_json])
    return server.stub().ExecuteBatch(request, timeout=timeout)


def assert_still_serving(server):
    assert server.client().execute("noop") is None
    assert server.process.poll() is None


# --- 1. text the server cannot encode ------------------------------------------------------------

def test_an_argument_name_with_a_lone_surrogate_is_invalid_argument_at_once(server):
    code, details, took = execute_raw(server, "noop", '{"\\ud800": 1}')
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert took < QUICK
    assert "\\ud800" in details and "noop" in details  # named, escaped so it can travel
    assert_still_serving(server)


def test_a_batch_item_with_a_lone_surrogate_name_fails_only_that_item(server):
    response = batch_raw(server, "noop", ["{}", '{"\\ud800": 1}', "{}"])
    assert [r.ok for r in response.results] == [True, False, True]
    error = response.results[1].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "\\ud800" in error.message


def test_a_tool_error_message_with_a_lone_surrogate_reaches_the_caller(server):
    code, details, took = execute_raw(server, "raise_tool_error", '{"code": "ABORTED", "message": "bad \\udfff"}')
    assert code == grpc.StatusCode.ABORTED and "bad \\udfff" in details and took < QUICK


# --- 2. decoding is linear in the request size ---------------------------------------------------

def test_a_long_key_above_a_wide_value_costs_linear_time(threaded):
    key = "k" * 200_000
    args_json = json.dumps({key: [0] * 20_000})  # 240 KB: quadratic path building copied 4 GB
    before = cpu_seconds(threaded.pid)
    code, details, took = execute_raw(threaded, "noop", args_json, timeout=30)
    spent = cpu_seconds(threaded.pid) - before
    assert code == grpc.StatusCode.INVALID_ARGUMENT and took < QUICK, (code, took)
    assert spent < 1.0, f"server spent {spent:.2f} s of CPU on a 240 KB request"
    assert len(details) < 1024  # the 200 KB name is not echoed whole


def test_a_long_key_above_a_wide_result_costs_linear_time(threaded):
    before = cpu_seconds(threaded.pid)
    result = threaded.client().execute("wide_under_long_key", {"key_length": 1_000_000, "width": 5_000})
    spent = cpu_seconds(threaded.pid) - before
    assert len(result["k" * 1_000_000]) == 5_000
    assert spent < 1.0, f"server spent {spent:.2f} s of CPU encoding the result"


# --- 3. BaseException from a tool ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit", "GeneratorExit", "CustomBaseException"])
def test_a_tool_raising_a_base_exception_fails_the_call_and_the_server_serves_on(server, kind):
    code, details, took = execute_raw(server, "raise_base", json.dumps({"kind": kind}))
    assert code == grpc.StatusCode.UNKNOWN and kind in details and took < QUICK, (code, details, took)
    assert_still_serving(server)


def test_a_batch_item_raising_a_base_exception_fails_only_that_item(server):
    response = batch_raw(server, "raise_base", ['{"kind": "SystemExit"}', '{"kind": "KeyboardInterrupt"}'])
    assert [r.ok for r in response.results] == [False, False]
    assert [r.error.type for r in response.results] == ["SystemExit", "KeyboardInterrupt"]
    assert_still_serving(server)


def test_a_stream_raising_a_base_exception_ends_with_a_status(server):
    request = pb.ExecuteToolRequest(tool_name="stream_then_raise_base", args_json='{"before": 2}')
    chunks = []
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        for chunk in server.stub().ExecuteStreamingTool(request, timeout=10):
            chunks.append(chunk)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN and "SystemExit" in caught.value.details()
    assert len(chunks) == 2 and time.monotonic() - started < QUICK
    assert_still_serving(server)


# --- 4. malformed values are INVALID_ARGUMENT naming the field -----------------------------------

def ndarray_args(dtype, shape, blob=b""):
    return json.dumps({"v": {"__snakepit__": "ndarray", "blob": 0, "dtype": dtype, "shape": shape}}), [blob]


@pytest.mark.parametrize("case, args", [
    ("500-deep list", ('{"v": ' + "[" * 500 + "]" * 500 + "}", [])),
    ("shape [0, 10**30]", ndarray_args("<f8", [0, 10 ** 30])),
    ("65 dimensions", ndarray_args("<f8", [1] * 65, b"\0" * 8)),
    ("dtype V0", ndarray_args("V0", [1])),
    ("dtype S0", ndarray_args("S0", [3])),
    ("subarray dtype", ndarray_args("(2,)<f8", [1], b"\0" * 16)),
    ("dtype as a dict", ndarray_args({"names": ["a"], "formats": ["<f8"], "itemsize": 10 ** 12}, [0])),
    ("structured dtype", ndarray_args("<i4,<f8", [1], b"\0" * 12)),
    ("integer over the digit limit", ('{"v": ' + "7" * 5000 + "}", [])),
    ("shape not a list", ndarray_args("<f8", "3", b"\0" * 24)),
    ("dtype text garbage", ndarray_args("(((", [1], b"\0")),
])
def test_malformed_values_are_invalid_argument_naming_the_field(server, case, args):
    args_json, blobs = args
    code, details, took = execute_raw(server, "echo", args_json, blobs=blobs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code, details)
    assert "args_json" in details, (case, details)
    assert took < QUICK


def test_an_integer_too_large_for_a_float_parameter_is_invalid_argument_naming_it(server):
    # Found by bench/fuzz.py: float(10**400) raised OverflowError inside the argument check (INTERNAL).
    code, details, _ = execute_raw(server, "typed", json.dumps({"i": 1, "f": 10 ** 400, "flag": True, "s": "", "raw": None,
                                                                 "ints": [], "mapping": {}, "arr": []}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'f'" in details, (code, details)


def test_a_result_integer_over_the_digit_limit_is_a_clear_error_naming_the_tool(server):
    code, details, _ = execute_raw(server, "big_int", '{"digits": 5000}')
    assert code == grpc.StatusCode.INTERNAL
    assert "big_int" in details and "4300" in details, details
    assert server.client().execute("big_int", {"digits": 4000}) == 10 ** 4000  # under the limit: exact


def test_a_result_nested_too_deep_is_a_clear_error_naming_the_tool(server):
    code, details, _ = execute_raw(server, "deep_list", '{"depth": 2000}')
    assert code == grpc.StatusCode.INTERNAL and "deep_list" in details and "deep" in details, details
    assert server.client().execute("deep_list", {"depth": 100}) is not None


# --- 5. one validation path for ExecuteTool and ExecuteBatch ------------------------------------

@pytest.mark.parametrize("args_json", ["{not json", "[1, 2]", '{"unknown": 1}', '{"v": {"__snakepit__": "bytes", "blob": 3}}'])
def test_batch_items_get_the_same_status_and_message_as_execute_tool(server, args_json):
    tool = "typed" if "unknown" in args_json else "echo"
    code, details, _ = execute_raw(server, tool, args_json)
    response = batch_raw(server, tool, [args_json])
    item = response.results[0]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not item.ok and item.error.code == code.value[0]
    assert item.error.message == details and item.error.traceback == ""


# --- 6. showcase tools bound their inputs and honour cancellation --------------------------------

def test_showcase_progress_refuses_an_unbounded_delay():
    with WorkerServer("threaded", "--adapter", SHOWCASE) as server:
        request = pb.ExecuteToolRequest(tool_name="progress", args_json='{"steps": 2, "delay": 1e9}')
        with pytest.raises(grpc.RpcError) as caught:
            list(server.stub().ExecuteStreamingTool(request, timeout=5))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "delay" in caught.value.details()


def test_showcase_progress_gives_its_slot_back_soon_after_its_deadline():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--max-workers", "1") as server:
        request = pb.ExecuteToolRequest(tool_name="progress", args_json='{"steps": 2, "delay": 30}')
        try:
            chunks = list(server.stub().ExecuteStreamingTool(request, timeout=1))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            # On a loaded machine the tool can see its deadline and return before the client's own
            # deadline timer fires: then the final chunk says so.
            assert json.loads(chunks[-1].data_json) == {"completed": 0, "cancelled": True}
        started = time.monotonic()
        assert server.client().execute("add", {"a": 1, "b": 2}, timeout=5) == 3  # the one slot is free again
        assert time.monotonic() - started < QUICK


# --- 7. ids and names a client chooses ------------------------------------------------------------

@pytest.mark.parametrize("session_id", ["a\n", "a\r", "x" * 129, "a b", "\\ud800"])
def test_session_ids_outside_the_documented_charset_are_invalid_argument(server, session_id):
    with pytest.raises(grpc.RpcError) as caught:
        server.stub().InitializeSession(pb.InitializeSessionRequest(session_id=session_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in caught.value.details()


def test_a_huge_unknown_tool_name_is_not_found_with_the_name_truncated(server):
    code, details, took = execute_raw(server, "t" * 20_000)
    assert code == grpc.StatusCode.NOT_FOUND, (code, details[:200])
    assert len(details) < 1024 and "ttttt" in details and took < QUICK


def test_a_tool_error_message_is_bounded_for_the_caller(server):
    code, details, _ = execute_raw(server, "raise_tool_error", json.dumps({"code": "ABORTED", "message": "m" * 50_000}))
    assert code == grpc.StatusCode.ABORTED and len(details) < 4096


def test_a_request_id_cannot_forge_log_lines_or_flood_them():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER) as server:
        forged = "r1\n2030-01-01 00:00:00,000 - [x] - ERROR - [forged] FORGED LINE"
        execute_raw(server, "raise_tool_error", '{"code": "ABORTED"}', request_id=forged)
        execute_raw(server, "raise_tool_error", '{"code": "ABORTED"}', request_id="z" * 1_000_000)
        assert server.client().execute("noop") is None
        lines = list(server.stderr_lines)
    assert not any(line.startswith("2030-01-01") for line in lines), lines
    assert any("FORGED LINE" in line and "\\n" in line for line in lines)  # kept, escaped, on one line
    assert max(len(line) for line in lines) < 2048


# --- 8. sessions are bounded -------------------------------------------------------------------------

def test_sessions_past_max_sessions_are_resource_exhausted():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-sessions", "3") as server:
        client = server.client()
        for i in range(3):
            client.initialize_session(f"s{i}")
        with pytest.raises(grpc.RpcError) as caught:
            server.stub().InitializeSession(pb.InitializeSessionRequest(session_id="s3"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-sessions" in caught.value.details()
        assert client.initialize_session("s0").created is False  # an existing one is still there
        assert client.cleanup_session("s1")
        assert client.initialize_session("s3").created


def test_a_session_ttl_past_the_maximum_is_resource_exhausted(server):
    with pytest.raises(grpc.RpcError) as caught:
        server.stub().InitializeSession(pb.InitializeSessionRequest(session_id="forever", ttl_seconds=136 * 365 * 86400),
                                        timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ttl_seconds" in caught.value.details()


# --- 9. authentication before the message is read ------------------------------------------------

def test_an_unauthenticated_large_request_is_refused_before_it_is_read():
    with WorkerServer("threaded", "--auth-token-env", "TOKEN", env={"TOKEN": "s3cret"}) as server:
        assert server.client(token="s3cret").execute("add", {"a": 1, "b": 2}) == 3
        before = proc_status_mb(server.pid, "VmHWM")
        client = server.client()
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            client.execute("echo", {"payload": b"\0" * (60 * 1024 * 1024)}, timeout=30)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        took = time.monotonic() - started
        growth = proc_status_mb(server.pid, "VmHWM") - before
    assert growth < 30, f"server peak RSS grew {growth:.0f} MB for a refused request"
    assert took < 5


# --- 10. a stalled reader holds only its own calls --------------------------------------------------

def stream_request(tool: str, args: dict) -> bytes:
    args_json, blobs = codec.encode(args)
    return pb.ExecuteToolRequest(tool_name=tool, args_json=args_json, blobs=blobs).SerializeToString()


def test_streams_that_never_grant_window_do_not_starve_other_clients():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-workers", "4") as server:
        with RawGrpcConnection("127.0.0.1", server.port, initial_window=0) as stalled:
            for _ in range(8):
                stalled.start_call(SERVICE + "ExecuteStreamingTool", stream_request("countdown", {"n": 1000}))
            stalled.pump(1.0)
            started = time.monotonic()
            for _ in range(8):
                assert server.client().execute("noop", timeout=5) is None
            assert time.monotonic() - started < QUICK * 2


def test_a_stalled_stream_is_ended_after_the_send_timeout():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-workers", "2", "--send-timeout", "1") as server:
        with RawGrpcConnection("127.0.0.1", server.port, initial_window=0) as stalled:
            streams = [stalled.start_call(SERVICE + "ExecuteStreamingTool", stream_request("countdown", {"n": 1000}))
                       for _ in range(3)]
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not all(s in stalled.ended for s in streams):
                stalled.pump(0.2)
            assert all(s in stalled.ended for s in streams), stalled.ended
        deadline = time.monotonic() + 5
        while server.client().stats().requests_active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.client().stats().requests_active == 0


def test_one_connection_cannot_take_more_than_its_share_of_calls():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-workers", "2",
                      "--max-calls-per-connection", "3") as server:
        with RawGrpcConnection("127.0.0.1", server.port) as greedy:
            calls = [greedy.start_call(SERVICE + "ExecuteTool", stream_request("stubborn_sleep", {"seconds": 2}))
                     for _ in range(5)]
            greedy.pump(1.0)
            refused = [s for s in calls if greedy.ended.get(s) == "trailers"
                       and greedy.trailers[s].get("grpc-status") == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])]
            assert len(refused) == 2, greedy.trailers
            assert "max-calls-per-connection" in greedy.trailers[refused[0]].get("grpc-message", "")
        assert server.client().execute("noop", timeout=5) is None


def test_connections_are_capped_each_on_its_own_when_together_they_pass_the_cap():
    # Below the cap in all, calls are not counted per connection (grpcio's peer() costs a GIL round
    # trip); past it, every call in flight is, the earlier ones too.
    exhausted = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])

    def refused(connection, streams):
        connection.pump(0.5)
        return [s for s in streams if connection.ended.get(s) == "trailers"
                and connection.trailers[s].get("grpc-status") == exhausted]

    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-workers", "2",
                      "--max-calls-per-connection", "3") as server:
        with RawGrpcConnection("127.0.0.1", server.port) as first, \
                RawGrpcConnection("127.0.0.1", server.port) as second:
            def sleeps(connection, n):
                return [connection.start_call(SERVICE + "ExecuteTool", stream_request("stubborn_sleep", {"seconds": 3}))
                        for _ in range(n)]

            first_calls = sleeps(first, 2)
            assert refused(first, first_calls) == []
            second_calls = sleeps(second, 3)  # 5 in flight in all, 3 on this connection: at its cap
            assert refused(second, second_calls) == []
            assert len(refused(second, sleeps(second, 1))) == 1  # its 4th
            assert refused(first, sleeps(first, 1)) == []  # the other connection's 3rd still runs
        assert server.client().execute("noop", timeout=5) is None


# --- 11. shutdown gives running calls their grace even when their clients left -------------------

def test_sigterm_gives_calls_whose_clients_left_the_grace_period(tmp_path):
    marker = tmp_path / "teardown"
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--grace", "10",
                      env={"SPEC_ADAPTER_TEARDOWN_FILE": str(marker)}) as server:
        code, _, _ = execute_raw(server, "stubborn_sleep", '{"seconds": 2}', timeout=0.3)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # the client is gone; the tool still runs
        started = time.monotonic()
        assert server.terminate(signal.SIGTERM) == 0
        took = time.monotonic() - started
        stderr = "\n".join(server.stderr_lines)
    assert took > 1.2, f"exited after {took:.2f} s: the running call got no grace"
    assert "still running" not in stderr
    assert marker.read_text() == "teardown\n"


# --- 12. bytes that are not a valid request message -------------------------------------------------

@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x01\xff"],
                         ids=["garbage", "truncated", "invalid-utf8"])
def test_undecodable_request_bytes_are_invalid_argument(server, payload):
    channel = server.channel()
    for method in ("ExecuteTool", "InitializeSession", "ExecuteBatch", "Ping"):
        call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value)
        assert "request" in caught.value.details()
    streaming = channel.unary_stream(SERVICE + "ExecuteStreamingTool", request_serializer=None,
                                     response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        list(streaming(payload, timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(server)
