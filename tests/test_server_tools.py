"""The adapter instance, the tool catalogue, streaming, and the per-call request context."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SPEC_ADAPTER, ServerFailedToStart, WorkerServer


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    started = time.time()
    with WorkerServer(request.param, "--adapter", SPEC_ADAPTER) as server:
        server.ready_unix = time.time()
        server.launched_unix = started
        yield server


# --- one adapter instance per process, set up before serving -------------------------------------

def test_one_adapter_instance_serves_every_call_and_setup_ran_once(server):
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda _: server.client().execute("instance_info"), range(24)))
    assert len({info["instance"] for info in infos}) == 1
    assert {info["setup_calls"] for info in infos} == {1}
    assert {info["pid"] for info in infos} == {server.pid}


def test_setup_finished_before_the_server_announced_readiness(server):
    info = server.client().execute("instance_info")
    assert info["setup_finished_unix"] is not None
    assert server.launched_unix < info["setup_finished_unix"] < server.ready_unix


def test_threaded_server_runs_tools_on_its_handler_threads(spec_threaded):
    threads = set()
    with ThreadPoolExecutor(4) as pool:
        for info in pool.map(lambda _: spec_threaded.client().execute("instance_info"), range(16)):
            threads.add(info["thread"])
    assert all(name.startswith("ThreadPoolExecutor-0") for name in threads), threads


def test_failing_setup_stops_start_up_with_the_error():
    for mode in ("threaded", "process"):
        server = WorkerServer(mode, "--adapter", "tests.adapters_for_tests.FailingSetupAdapter", startup_timeout=30)
        with pytest.raises(ServerFailedToStart):
            server.start()
        assert server.process.returncode != 0
        assert any("model file missing" in line for line in server.stderr_lines), server.stderr_lines


# --- the catalogue --------------------------------------------------------------------------------

def test_describe_tools_reports_parameters_types_defaults_and_streaming(server):
    response = server.client().describe_tools()
    assert response.adapter == SPEC_ADAPTER
    tools = {t.name: t for t in response.tools}
    typed = {p.name: p for p in tools["typed"].parameters}
    assert list(typed) == ["i", "f", "flag", "s", "raw", "ints", "mapping", "arr", "maybe"]
    assert typed["i"].type == "int" and typed["i"].required and typed["i"].default_json == ""
    assert typed["ints"].type == "list[int]" and typed["arr"].type == "ndarray"
    assert typed["maybe"].type == "int | None" and not typed["maybe"].required
    assert json.loads(typed["maybe"].default_json) is None
    wait = {p.name: p for p in tools["wait_for_cancel"].parameters}
    assert "ctx" not in wait and json.loads(wait["limit"].default_json) == 10.0
    assert tools["countdown"].supports_streaming and not tools["typed"].supports_streaming
    assert tools["noop"].description == "Do nothing."
    assert tools["typed"].description.startswith("One parameter of each checked type")


def test_ping_reports_pid_mode_and_adapter(server):
    response = server.client().ping("hello")
    assert response.message == "hello" and response.pid == server.pid
    assert response.worker_mode == server.mode and response.adapter == SPEC_ADAPTER
    assert abs(response.server_time_unix_ms / 1000 - time.time()) < 60


# --- streaming ----------------------------------------------------------------------------------------

def test_generator_tool_streams_numbered_chunks_then_a_final_chunk_with_the_return_value(server):
    chunks = list(server.stub().ExecuteStreamingTool(
        pb.ExecuteToolRequest(tool_name="countdown", args_json='{"n": 4}'), timeout=30))
    assert [c.sequence for c in chunks] == [0, 1, 2, 3, 4]
    assert [json.loads(c.data_json) for c in chunks] == [0, 1, 2, 3, "done"]
    assert [c.is_final for c in chunks] == [False, False, False, False, True]


def test_streaming_tool_with_no_items_sends_only_the_final_chunk(server):
    chunks = list(server.stub().ExecuteStreamingTool(
        pb.ExecuteToolRequest(tool_name="countdown", args_json='{"n": 0}'), timeout=30))
    assert len(chunks) == 1 and chunks[0].is_final and json.loads(chunks[0].data_json) == "done"


# --- the request context --------------------------------------------------------------------------

def test_context_carries_request_id_tool_name_metadata_and_mode(server):
    response = server.stub().ExecuteTool(pb.ExecuteToolRequest(
        tool_name="context_info", request_id="req-abc-1", metadata={"tenant": "acme", "trace": "t1"}), timeout=30)
    info = json.loads(response.result_json)
    assert info["request_id"] == "req-abc-1" and response.request_id == "req-abc-1"
    assert info["tool_name"] == "context_info"
    assert info["metadata"] == {"tenant": "acme", "trace": "t1"}
    assert info["worker_mode"] == server.mode
    assert info["session_id"] == "" and info["has_session"] is False and info["cancelled"] is False


def test_request_ids_are_generated_when_missing_and_unique(server):
    stub = server.stub()
    ids = [stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop"), timeout=30).request_id for _ in range(5)]
    assert all(ids) and len(set(ids)) == 5


def test_context_reports_the_deadline_remaining(server):
    client = server.client()
    with_deadline = client.execute("context_info", timeout=20)
    assert 10 < with_deadline["time_remaining"] <= 20.5  # grpc-timeout is sent rounded up a little
    without = server.stub().ExecuteTool(pb.ExecuteToolRequest(tool_name="context_info"))  # no deadline
    assert json.loads(without.result_json)["time_remaining"] is None


def test_context_carries_the_session(server):
    client = server.client()
    session_id = client.initialize_session("ctx-session").session_id
    info = client.execute("context_info", session_id=session_id)
    assert info["session_id"] == "ctx-session" and info["has_session"] is True
    client.cleanup_session(session_id)


def wait_for_seen(client, token, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = client.execute("cancel_seen", {"token": token})
        if seen is not None:
            return seen
        time.sleep(0.05)
    return None


def test_cancelled_flag_turns_true_when_the_deadline_passes(server):
    client = server.client()
    token = f"deadline-{server.mode}"
    try:
        client.execute("wait_for_cancel", {"token": token, "limit": 10.0}, timeout=0.5)
    except BridgeCallError as error:
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # (the tool may notice the deadline and answer a hair before the client gives up: both are fine)
    seen = wait_for_seen(client, token)
    assert seen is not None and seen["cancelled"] is True
    assert seen["waited"] < 5.0  # it noticed the deadline, not the 10 s limit


def test_cancelled_flag_turns_true_when_the_client_cancels(server):
    stub = server.stub()
    token = f"client-cancel-{server.mode}"
    future = stub.ExecuteTool.future(pb.ExecuteToolRequest(
        tool_name="wait_for_cancel", args_json=json.dumps({"token": token, "limit": 10.0})), timeout=30)
    time.sleep(0.5)
    assert future.cancel()
    seen = wait_for_seen(server.client(), token)
    assert seen is not None and seen["cancelled"] is True and seen["waited"] < 5.0


def test_cancelling_a_stream_stops_the_generator(server):
    with WorkerServer(server.mode, "--adapter", "snakepit_bridge.adapters.showcase.ShowcaseAdapter") as showcase:
        stub = showcase.stub()
        call = stub.ExecuteStreamingTool(pb.ExecuteToolRequest(
            tool_name="progress", args_json='{"steps": 1000, "delay": 0.01}'), timeout=30)
        first = next(call)
        assert json.loads(first.data_json)["step"] == 1
        call.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and showcase.client().stats().requests_active:
            time.sleep(0.05)
        stats = showcase.client().stats()
        assert stats.requests_active == 0  # the generator ended well before its 10 s of steps
