"""ExecuteBatch: one tool over many argument sets, one result per item in order, errors isolated per item."""
from __future__ import annotations

import json
import time

import grpc
import pytest

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SHOWCASE, WorkerServer


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SHOWCASE, *(["--max-workers", "4"] if request.param == "threaded"
                                                              else [])) as server:
        yield server


def test_batch_returns_one_result_per_item_in_order(server):
    items = [{"a": i, "b": 1000} for i in range(50)]
    results = server.client().batch("add", items)
    assert [r.ok for r in results] == [True] * 50
    assert [r.value for r in results] == [i + 1000 for i in range(50)]
    assert all(type(r.value) is int for r in results)


def test_empty_batch_returns_no_results(server):
    assert server.client().batch("add", []) == []


def test_bad_item_fails_alone_with_invalid_argument_naming_the_parameter(server):
    results = server.client().batch("add", [{"a": 1, "b": 2}, {"a": 1}, {"a": "x", "b": 2}, {"a": 5, "b": 5}])
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[0].value == 3 and results[3].value == 10
    missing, wrong = results[1].error, results[2].error
    assert missing.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "'b'" in missing.message
    assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "'a'" in wrong.message
    assert missing.tool_name == "add" and missing.traceback == ""


def test_item_whose_tool_raises_carries_type_message_and_traceback(server):
    results = server.client().batch("fail", [{"kind": "KeyError", "message": "k"}, {"message": "item -1 broke"}])
    assert [r.error.type for r in results] == ["KeyError", "ValueError"]
    error = results[1].error
    assert not results[1].ok and "-1" in error.message
    assert error.code == grpc.StatusCode.UNKNOWN.value[0]
    assert "Traceback" in error.traceback and "in fail" in error.traceback


def test_item_with_an_argument_out_of_range_is_invalid_argument_naming_it(server):
    results = server.client().batch("sleep", [{"seconds": 0.0}, {"seconds": -1.0}])
    assert results[0].ok and results[0].value["cancelled"] is False, results[0].error
    error = results[1].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "seconds" in error.message and "-1" in error.message


def test_items_carry_values_of_every_type(server):
    items = [{"v": b"\x00\xff"}, {"v": [1, 2.0, None]}, {"v": {"n": 2**63 - 1}}]
    results = server.client().batch("echo", items)
    assert [r.value for r in results] == items


@pytest.mark.parametrize("tool, code", [("no_such_tool", grpc.StatusCode.NOT_FOUND),
                                        ("progress", grpc.StatusCode.FAILED_PRECONDITION),
                                        ("_private", grpc.StatusCode.NOT_FOUND)])
def test_batch_of_a_tool_that_cannot_run_fails_as_a_whole(server, tool, code):
    with pytest.raises(BridgeCallError) as caught:
        server.client().batch(tool, [{}])
    assert caught.value.code == code and tool in caught.value.message


def test_batch_items_are_counted_as_tool_calls(server):
    client = server.client()
    before = client.stats().requests_total
    client.batch("add", [{"a": 1, "b": 1}] * 7)
    assert client.stats().requests_total - before == 7


def test_batch_items_share_the_session(server):
    client = server.client()
    session_id = client.initialize_session().session_id
    results = client.batch("session_counter", [{}] * 5, session_id=session_id)
    assert all(r.ok for r in results), results[0].error
    assert sorted(r.value for r in results) == [1, 2, 3, 4, 5]
    assert client.get_session_state(session_id) == {"count": 5}
    client.cleanup_session(session_id)


def test_batch_with_an_unknown_session_is_not_found(server):
    with pytest.raises(BridgeCallError) as caught:
        server.client().batch("session_counter", [{}], session_id="no-such-session")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_threaded_server_runs_batch_items_in_parallel_bounded_by_max_parallelism():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--max-workers", "4") as server:
        client = server.client()
        started = time.monotonic()
        results = client.batch("sleep", [{"seconds": 0.5}] * 4)
        parallel = time.monotonic() - started
        assert all(r.ok for r in results), results[0].error
        assert parallel < 1.5, f"4 x 0.5 s batch items took {parallel:.2f} s on 4 workers (serial: 2 s)"
        started = time.monotonic()
        client.batch("sleep", [{"seconds": 0.3}] * 4, max_parallelism=2)
        assert time.monotonic() - started >= 0.55  # two rounds of two


def test_batch_items_see_one_request_id_and_context(spec_threaded):
    stub = spec_threaded.stub()
    response = stub.ExecuteBatch(pb.ExecuteBatchRequest(tool_name="context_info", request_id="batch-7",
                                                        metadata={"k": "v"}, items=[pb.BatchItem()] * 3), timeout=30)
    assert response.request_id == "batch-7"
    assert all(r.ok for r in response.results), response.results[0].error
    infos = [json.loads(r.result_json) for r in response.results]
    assert [i["request_id"] for i in infos] == ["batch-7"] * 3
    assert all(i["metadata"] == {"k": "v"} and i["tool_name"] == "context_info" for i in infos)
