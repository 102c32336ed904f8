"""A ToolCall's request id lives in the call's own context: it follows a stream into whichever thread
resumes it, reaches batch items, and never leaks into the thread that ran a step.

grpcio's sync server happens to drive a stream from one handler thread, so the thread hops are made
here by stepping the response iterator from fresh threads, with a stand-in for grpc's servicer
context (the only stand-in: the servicer, gate, stats and adapter are the real ones)."""
from __future__ import annotations

import threading

import grpc
import pytest

from snakepit_bridge import BaseAdapter, tool
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from snakepit_bridge.server.gate import ToolGate
from snakepit_bridge.server.logs import current_request_id
from snakepit_bridge.server.servicer import BridgeServicer, ServerInfo
from snakepit_bridge.server.sessions import SessionStore
from snakepit_bridge.server.stats import ServerStats


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.active = True
        self.aborted: tuple | None = None

    def time_remaining(self):
        return None

    def is_active(self):
        return self.active

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def add_callback(self, callback):
        return True

    def set_trailing_metadata(self, metadata):
        pass

    def abort(self, code, message):
        self.aborted = (code, message)
        raise Aborted(message)


class SeenIds(BaseAdapter):
    __thread_safe__ = True

    @tool
    def ids(self, n: int = 3):
        for _ in range(n):
            yield current_request_id()
        return current_request_id()

    @tool
    def one(self) -> str:
        return current_request_id()

    @tool
    def broken(self):
        raise ValueError("no")


@pytest.fixture
def servicer():
    return BridgeServicer(SeenIds(), info=ServerInfo("threaded", 4), gate=ToolGate(4, 8), sessions=SessionStore(),
                          stats=ServerStats())


def in_new_thread(fn):
    out: dict = {}

    def run():
        out["value"] = fn()
        out["after"] = current_request_id()  # what the stepping thread is left with

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out["value"], out["after"]


def test_a_stream_resumed_in_other_threads_keeps_its_request_id_and_leaks_none(servicer):
    chunks = servicer.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="ids", request_id="stream-7"),
                                           FakeContext())
    seen = [in_new_thread(lambda: next(chunks)) for _ in range(4)]  # 3 chunks and the final one
    assert [chunk.data_json for chunk, _ in seen] == ['"stream-7"'] * 4
    assert seen[-1][0].is_final
    assert all(after == "-" for _, after in seen)
    assert current_request_id() == "-"
    assert servicer.stats.requests_total == 1 and servicer.stats.requests_failed == 0
    assert servicer.gate.running == 0


def test_a_stream_closed_by_its_client_between_chunks_gives_its_slot_back(servicer):
    chunks = servicer.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="ids", args_json='{"n": 5}'),
                                           FakeContext())
    assert next(chunks).sequence == 0
    chunks.close()  # what grpc does when the client cancels while a chunk is out
    assert servicer.gate.running == 0
    assert servicer.stats.requests_failed == 1


def test_unary_and_batch_items_see_the_calls_request_id(servicer):
    response = servicer.ExecuteTool(pb.ExecuteToolRequest(tool_name="one", request_id="unary-1"), FakeContext())
    assert response.result_json == '"unary-1"' and response.request_id == "unary-1"
    batch = servicer.ExecuteBatch(pb.ExecuteBatchRequest(tool_name="one", request_id="batch-1",
                                                         items=[pb.BatchItem(args_json="{}")] * 3), FakeContext())
    assert [result.result_json for result in batch.results] == ['"batch-1"'] * 3
    assert current_request_id() == "-"


def test_a_generated_request_id_is_unique_per_call(servicer):
    first = servicer.ExecuteTool(pb.ExecuteToolRequest(tool_name="one"), FakeContext())
    second = servicer.ExecuteTool(pb.ExecuteToolRequest(tool_name="one"), FakeContext())
    assert first.request_id != second.request_id
    assert first.result_json == f'"{first.request_id}"'


def test_a_failing_call_ends_the_rpc_once_with_its_status_and_is_counted(servicer):
    context = FakeContext()
    with pytest.raises(Aborted):
        servicer.ExecuteTool(pb.ExecuteToolRequest(tool_name="broken"), context)
    assert context.aborted[0] == grpc.StatusCode.UNKNOWN and "ValueError" in context.aborted[1]
    assert servicer.stats.requests_failed == 1 and servicer.gate.running == 0
    refused = FakeContext()
    with pytest.raises(Aborted):
        servicer.ExecuteTool(pb.ExecuteToolRequest(tool_name="missing"), refused)
    assert refused.aborted[0] == grpc.StatusCode.NOT_FOUND


def test_tool_error_takes_grpcs_status_codes_or_the_bridges_own():
    from snakepit_bridge import StatusCode, ToolError

    assert ToolError("x", code=grpc.StatusCode.NOT_FOUND).code is StatusCode.NOT_FOUND
    assert ToolError("x", code=StatusCode.ABORTED).code.number == grpc.StatusCode.ABORTED.value[0]
    assert ToolError("x").code is StatusCode.UNKNOWN
    with pytest.raises(TypeError):
        ToolError("x", code=404)
    assert [code.name for code in StatusCode] == [code.name for code in grpc.StatusCode]
    assert [code.value for code in StatusCode] == [code.value for code in grpc.StatusCode]
