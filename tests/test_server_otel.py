"""OpenTelemetry spans (the `otel` extra): one server span per tool call, the child of the caller's
span, ended with the call's gRPC status; the tool's own spans are its children.

In process with the SDK's in-memory exporter (the provider the process already has is the one used),
then as operators run it: a worker subprocess configured by the standard OTEL_* variables only,
exporting OTLP over HTTP to a receiver in this test, on both transports.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402
from opentelemetry.trace import StatusCode as SpanStatus  # noqa: E402

from snakepit_bridge.generated import snakepit_bridge_pb2 as pb  # noqa: E402
from snakepit_bridge.generated import snakepit_bridge_pb2_grpc as pb_grpc  # noqa: E402
from snakepit_bridge.server import otel  # noqa: E402
from tests.servers import WorkerServer  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACED_ADAPTER = "tests.adapters_for_tests.TracedAdapter"


# --- in process: the SDK's in-memory exporter -------------------------------------------------------
@pytest.fixture(scope="module")
def exporter():
    """The process's tracer provider, with an in-memory exporter (a provider can be set once a process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another test set a tracer provider this test cannot use"
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture(scope="module")
def stub(exporter):
    from snakepit_bridge.server.settings import parse_settings
    from snakepit_bridge.server.worker import Worker, start_serving

    worker = Worker(parse_settings("threaded", ["--adapter", TRACED_ADAPTER, "--host", "127.0.0.1", "--port", "0",
                                                "--transport", "grpcio", "--max-workers", "4"]))
    endpoint = start_serving(worker)
    assert worker.tracing is not None and worker.tracing.provider is None, "the process's own provider is used"
    channel = grpc.insecure_channel(endpoint.target)
    yield pb_grpc.BridgeServiceStub(channel)
    channel.close()
    worker.shutdown()


def spans_of(exporter, request_id: str):
    """The finished spans of one call (its server span and every descendant), once the server span ended."""
    deadline = time.monotonic() + 10
    while True:
        spans = exporter.get_finished_spans()
        roots = [span for span in spans if span.attributes.get("snakepit.request_id") == request_id]
        if roots:
            trace_id = roots[0].context.trace_id
            return roots[0], [span for span in spans if span.context.trace_id == trace_id and span is not roots[0]]
        assert time.monotonic() < deadline, f"no span of call {request_id}"
        time.sleep(0.01)


def test_a_tool_call_is_a_server_span_that_is_the_child_of_the_callers_span(stub, exporter):
    response = stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop", request_id="otel-unary"),
                                metadata=[("traceparent", TRACEPARENT)], timeout=10)
    assert response.request_id == "otel-unary"
    span, _ = spans_of(exporter, "otel-unary")
    assert span.name == "ExecuteTool noop" and span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.method"] == "ExecuteTool"
    assert span.attributes["rpc.service"] == "snakepit.bridge.BridgeService"
    assert span.attributes["snakepit.tool"] == "noop" and span.attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code is not SpanStatus.ERROR
    admitted = [event for event in span.events if event.name == "admitted"]
    assert len(admitted) == 1 and admitted[0].attributes["snakepit.queue_wait_ms"] >= 0
    assert span.start_time <= admitted[0].timestamp <= span.end_time


def test_the_tools_own_spans_are_children_of_the_call_span(stub, exporter):
    response = stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="traced_steps", args_json='{"steps": 3}',
                                                      request_id="otel-children"),
                                metadata=[("traceparent", TRACEPARENT)], timeout=10)
    assert json.loads(response.result_json) == TRACE_ID  # the call's span was current while the tool ran
    span, descendants = spans_of(exporter, "otel-children")
    steps = sorted((s for s in descendants if s.name.startswith("step ")), key=lambda s: s.name)
    assert [s.name for s in steps] == ["step 0", "step 1", "step 2"]
    assert all(s.parent is not None and s.parent.span_id == span.context.span_id for s in steps)


def test_a_call_without_a_traceparent_is_the_root_of_a_new_trace(stub, exporter):
    stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop", request_id="otel-root"), timeout=10)
    span, _ = spans_of(exporter, "otel-root")
    assert span.parent is None and span.context.trace_id != int(TRACE_ID, 16)


def test_a_tool_that_raises_ends_its_span_as_an_error_with_the_status_the_caller_saw(stub, exporter):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="raise_tool_error",
                                               args_json='{"code": "FAILED_PRECONDITION", "message": "not yet"}',
                                               request_id="otel-raise"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    span, _ = spans_of(exporter, "otel-raise")
    assert span.status.status_code is SpanStatus.ERROR and "FAILED_PRECONDITION" in span.status.description
    assert "not yet" in span.status.description
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_a_call_to_an_unknown_tool_is_named_by_its_method_alone(stub, exporter):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="no_such_tool_x7", request_id="otel-unknown"), timeout=10)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    span, _ = spans_of(exporter, "otel-unknown")
    assert span.name == "ExecuteTool" and span.attributes["snakepit.tool"] == "no_such_tool_x7"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.status_code is SpanStatus.ERROR


def test_a_stream_span_ends_after_its_last_chunk_and_a_stream_that_fails_is_an_error(stub, exporter):
    chunks = list(stub.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="countdown", args_json='{"n": 3}',
                                                                  request_id="otel-stream"), timeout=10))
    assert len(chunks) == 4 and chunks[-1].is_final
    span, _ = spans_of(exporter, "otel-stream")
    assert span.name == "ExecuteStreamingTool countdown" and span.attributes["rpc.grpc.status_code"] == 0
    with pytest.raises(grpc.RpcError):
        list(stub.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="stream_then_fail", args_json='{"before": 2}',
                                                             request_id="otel-stream-fail"), timeout=10))
    span, _ = spans_of(exporter, "otel-stream-fail")
    assert span.status.status_code is SpanStatus.ERROR
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]


def test_a_stream_the_client_leaves_ends_its_span_as_cancelled(stub, exporter):
    stream = stub.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="countdown", args_json='{"n": 100000}',
                                                             request_id="otel-stream-left"), timeout=10)
    next(stream)
    stream.cancel()
    span, _ = spans_of(exporter, "otel-stream-left")
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.status.status_code is SpanStatus.ERROR


def test_each_batch_item_is_a_child_span_and_a_failed_item_is_an_error(stub, exporter):
    items = [pb.BatchItem(args_json='{"code": "NOT_FOUND"}'), pb.BatchItem(args_json='{"code": "ABORTED"}')]
    stub.ExecuteBatch(pb.ExecuteBatchRequest(tool_name="noop", items=[pb.BatchItem(), pb.BatchItem()],
                                             request_id="otel-batch"), metadata=[("traceparent", TRACEPARENT)],
                      timeout=10)
    span, descendants = spans_of(exporter, "otel-batch")
    assert span.name == "ExecuteBatch noop" and span.attributes["snakepit.batch.failed"] == 0
    item_spans = sorted((s for s in descendants if s.name == "ExecuteBatch item noop"),
                        key=lambda s: s.attributes["snakepit.batch.index"])
    assert [s.attributes["snakepit.batch.index"] for s in item_spans] == [0, 1]
    assert all(s.parent is not None and s.parent.span_id == span.context.span_id for s in item_spans)
    assert all(any(event.name == "admitted" for event in s.events) for s in item_spans)

    response = stub.ExecuteBatch(pb.ExecuteBatchRequest(tool_name="raise_tool_error", items=items,
                                                        request_id="otel-batch-fail"), timeout=10)
    assert [result.ok for result in response.results] == [False, False]
    span, descendants = spans_of(exporter, "otel-batch-fail")
    assert span.attributes["snakepit.batch.failed"] == 2 and span.status.status_code is not SpanStatus.ERROR
    failed = [s for s in descendants if s.name == "ExecuteBatch item raise_tool_error"]
    assert len(failed) == 2 and all(s.status.status_code is SpanStatus.ERROR for s in failed)


# --- configuration from the environment -------------------------------------------------------------
def test_a_worker_without_otel_variables_does_not_even_import_opentelemetry():
    with WorkerServer("threaded", "--adapter", TRACED_ADAPTER) as server:
        assert server.client().execute("imported_modules", {"prefix": "opentelemetry"}) == []
        assert server.client().execute("imported_modules", {"prefix": "snakepit_bridge.server.otel"}) != []


def test_otel_variables_without_the_extra_installed_are_a_start_up_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry now raises ImportError
    extra = r"pip install 'snakepit_bridge\[otel\]'"
    with pytest.raises(otel.OtelConfigError, match=r"OTEL_TRACES_EXPORTER=otlp .*" + extra):
        otel.configure({"OTEL_TRACES_EXPORTER": "otlp"})
    assert otel.configure({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None


@pytest.mark.parametrize("transport", ["grpcio", "grpclib"])
def test_an_unknown_exporter_or_protocol_stops_the_worker_at_start_with_its_name(transport):
    for env, expected in (({"OTEL_TRACES_EXPORTER": "zipkin_json_nope"}, "no exporter named 'zipkin_json_nope'"),
                          ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
                           "OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon'")):
        server = WorkerServer("threaded", "--transport", transport, env=env, startup_timeout=20)
        with pytest.raises(Exception):
            server.start()
        server.process.wait(10)
        assert server.process.returncode != 0
        assert any(expected in line for line in server.stderr_lines), server.stderr_lines


# --- as operators run it: OTEL_* variables, OTLP over HTTP ------------------------------------------
class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every span it is sent, with its resource."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        received = self.spans = []  # (resource attributes, span)
        self.paths: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                received_paths.append(self.path)
                for resource_spans in request.resource_spans:
                    resource = {kv.key: kv.value.string_value or kv.value.int_value
                                for kv in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        received.extend((resource, span) for span in scope_spans.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        received_paths = self.paths
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.http.server_address[1]}"

    def wait_for(self, predicate, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            found = [(resource, span) for resource, span in list(self.spans) if predicate(span)]
            if found:
                return found
            assert time.monotonic() < deadline, f"no such span among {len(self.spans)} received"
            time.sleep(0.02)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def attribute(span, key):
    return next((kv.value.string_value or kv.value.int_value for kv in span.attributes if kv.key == key), None)


@pytest.mark.parametrize("transport", ["grpcio", "grpclib"])
def test_a_worker_configured_by_otel_variables_exports_each_call_over_otlp(receiver, transport):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "otel-test-worker",
           "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with WorkerServer("threaded", "--adapter", TRACED_ADAPTER, "--transport", transport, "--log-level", "DEBUG",
                      env=env) as server:
        stub = server.stub()
        stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="traced_steps", args_json='{"steps": 1}',
                                               request_id="otlp-1"), metadata=[("traceparent", TRACEPARENT)],
                         timeout=10)
        [(resource, span)] = receiver.wait_for(lambda s: attribute(s, "snakepit.request_id") == "otlp-1")
        assert span.name == "ExecuteTool traced_steps" and span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_ID and span.kind == span.SPAN_KIND_SERVER
        assert resource["service.name"] == "otel-test-worker" and resource["process.pid"] == server.pid
        assert resource["snakepit.worker_mode"] == "threaded"
        receiver.wait_for(lambda s: s.name == "step 0" and s.parent_span_id == span.span_id)
        assert set(receiver.paths) == {"/v1/traces"}

        # Without a traceparent the span is a root, and the call's log lines carry its trace id.
        stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop", request_id="otlp-root"), timeout=10)
        [(_, root)] = receiver.wait_for(lambda s: attribute(s, "snakepit.request_id") == "otlp-root")
        assert not root.parent_span_id
        deadline = time.monotonic() + 10
        while not any("[otlp-root trace=" in line for line in list(server.stderr_lines)):
            assert time.monotonic() < deadline, "no log line of the call"
            time.sleep(0.01)
        assert any(f"[otlp-root trace={root.trace_id.hex()}]" in line for line in server.stderr_lines)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_spans_still_buffered_are_exported_when_the_worker_stops(receiver, processes):
    # pre-forked children leave with os._exit, past atexit: the worker's shutdown must flush them itself
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces",
           "OTEL_BSP_SCHEDULE_DELAY": "600000"}  # ten minutes: only the shutdown's flush can send them
    server = WorkerServer("process", "--processes", processes, env=env).start()
    server.client().execute("add", {"a": 1, "b": 2})
    time.sleep(0.3)
    assert receiver.spans == []
    assert server.terminate() == 0
    [(resource, span)] = receiver.wait_for(lambda s: s.name == "ExecuteTool add", timeout=5)
    assert resource["service.name"] == otel.DEFAULT_SERVICE_NAME and resource["snakepit.worker_mode"] == "process"


def test_otel_sdk_disabled_turns_spans_off_whatever_else_is_set(receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_SDK_DISABLED": "true"}
    with WorkerServer("threaded", env=env) as server:
        server.client().execute("add", {"a": 1, "b": 2})
        assert server.terminate() == 0
    assert receiver.spans == [] and not any("OpenTelemetry" in line for line in server.stderr_lines)
