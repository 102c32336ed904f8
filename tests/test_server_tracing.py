"""W3C trace context: the caller's `traceparent` metadata reaches the tool's RequestContext and every
log line of the call; a header that does not parse is ignored and the call is served untraced."""
from __future__ import annotations

import json
import time

import pytest

from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from snakepit_bridge.server import tracing
from tests.servers import SPEC_ADAPTER, WorkerServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def server():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--log-level", "DEBUG") as server:
        yield server


def context_info(server, metadata=(), request_id=""):
    response = server.stub().ExecuteTool(pb.ExecuteToolRequest(tool_name="context_info", request_id=request_id),
                                         metadata=list(metadata), timeout=10)
    return json.loads(response.result_json)


def test_the_callers_traceparent_reaches_the_tool_and_every_log_line_of_the_call(server):
    info = context_info(server, [("traceparent", TRACEPARENT)], request_id="traced-1")
    assert info["traceparent"] == TRACEPARENT and info["trace_id"] == TRACE_ID
    deadline = time.monotonic() + 10
    while not any("[traced-1 trace=" in line for line in list(server.stderr_lines)):
        assert time.monotonic() < deadline, "no log line of the traced call"
        time.sleep(0.01)
    lines = [line for line in list(server.stderr_lines) if "[traced-1" in line]
    assert lines and all(f"[traced-1 trace={TRACE_ID}]" in line for line in lines), lines


def test_a_call_without_traceparent_has_none_and_its_log_lines_are_unchanged(server):
    info = context_info(server, request_id="untraced-1")
    assert info["traceparent"] == "" and info["trace_id"] == ""
    deadline = time.monotonic() + 10
    while not any("[untraced-1]" in line for line in list(server.stderr_lines)):
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("header", [
    TRACEPARENT.upper(),                                     # hex must be lower case
    f"ff-{TRACE_ID}-00f067aa0ba902b7-01",                    # version ff is invalid
    f"00-{'0' * 32}-00f067aa0ba902b7-01",                    # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",                          # all-zero parent id
    f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",              # version 00 has exactly four fields
    f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01",               # short trace id
    "not a traceparent",
])
def test_an_invalid_traceparent_is_ignored_and_the_call_served(server, header):
    assert tracing.parse(header) is None
    info = context_info(server, [("traceparent", header)])
    assert info["traceparent"] == "" and info["tool_name"] == "context_info"


def test_a_later_version_may_carry_more_fields():
    parsed = tracing.parse(f"01-{TRACE_ID}-00f067aa0ba902b7-01-what-comes-next")
    assert parsed is not None and parsed.trace_id == TRACE_ID and parsed.sampled
    assert tracing.parse(f"00-{TRACE_ID}-00f067aa0ba902b7-00").sampled is False
