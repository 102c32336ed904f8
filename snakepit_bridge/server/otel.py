"""OpenTelemetry: one span per tool call (the `otel` extra), the child of the caller's span when the
call's metadata carries a W3C `traceparent`.

Spans are on when the standard environment asks for an exporter (`OTEL_TRACES_EXPORTER`, or an OTLP
endpoint in `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), or when the process
already has an SDK tracer provider (`opentelemetry-instrument`, or an adapter's module that set one):
then that provider is used as it is. Otherwise nothing here is imported and a call pays nothing.
The rest of the standard variables apply as the SDK reads them: `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`, and
`OTEL_SDK_DISABLED=true` turns it all off.

The span of a call starts when the call arrives (so queue time is inside it, marked by an `admitted`
event) and ends with the call's gRPC status. It is the current span while the tool runs: a tool's
own spans (`trace.get_tracer(__name__).start_as_current_span(...)`) are its children.
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Mapping

from ..contract.errors import StatusCode
from .failures import safe_text, short_name

if TYPE_CHECKING:
    from .toolcall import ToolCall

SERVICE = "snakepit.bridge.BridgeService"
DEFAULT_SERVICE_NAME = "snakepit-worker"
ENABLING = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# OTEL_TRACES_EXPORTER=otlp picks its exporter by protocol, as the SDK's own configurator does; the
# specification's default protocol is http/protobuf, which is what the `otel` extra installs.
OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
EXTRA = "pip install 'snakepit_bridge[otel]'"


class OtelConfigError(Exception):
    """The environment asks for spans this process cannot export: a start-up error, named."""


class CallTracing:
    """Starts and ends the spans of tool calls with one tracer."""

    def __init__(self, tracer: Any, provider: Any = None) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = tracer
        self.provider = provider  # ours to flush and shut down, or None when the process brought its own
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()

    def start(self, call: ToolCall) -> Any:
        """The span of `call`, started now and made current in the call's context."""
        trace = self._trace
        parent = None
        if call.trace is not None:
            carrier = {"traceparent": call.trace.header}
            state = _metadata_value(call.context, "tracestate")
            if state:
                carrier["tracestate"] = state
            parent = self._propagator.extract(carrier)
        request = call.request
        tool = call.known_tool()
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": call.method,
                      "snakepit.tool": short_name(request.tool_name), "snakepit.request_id": call.request_id,
                      "snakepit.worker_mode": call.server.info.worker_mode}
        if request.session_id:
            attributes["snakepit.session_id"] = short_name(request.session_id)
        # The name must stay few-valued: a tool the adapter does not have is named by the method alone.
        span = self.tracer.start_span(f"{call.method} {tool}" if tool else call.method, context=parent,
                                      kind=trace.SpanKind.SERVER, attributes=attributes)
        call.scope.run(self.make_current, span)  # in the call's own Context: no detach needed
        return span

    def make_current(self, span: Any) -> None:
        """`span` the current span of the running Context (which is the call's, or a batch item's, own)."""
        self._context.attach(self._trace.set_span_in_context(span))

    def start_item(self, call: ToolCall, index: int) -> Any:
        """The span of one batch item, a child of the batch call's span (current in the item's context)."""
        assert call.spec is not None
        return self.tracer.start_span(f"{call.method} item {call.spec.name}", kind=self._trace.SpanKind.INTERNAL,
                                      attributes={"snakepit.tool": call.spec.name, "snakepit.batch.index": index})

    def trace_id(self, span: Any) -> str:
        span_context = span.get_span_context()
        return format(span_context.trace_id, "032x") if span_context.is_valid else ""

    def end(self, span: Any, code: StatusCode, message: str = "") -> None:
        """End `span` with the call's status: any code but OK marks it an error (a server span's rule)."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not StatusCode.OK:
            status = self._trace.Status(self._trace.StatusCode.ERROR, f"{code.name}: {safe_text(message, 512)}")
            span.set_status(status)
        span.end()

    def shutdown(self) -> None:
        """Export what is buffered (a worker that stops cleanly loses no span)."""
        if self.provider is not None:
            self.provider.shutdown()


def configure(environ: Mapping[str, str] = os.environ, *,
              resource_attributes: Mapping[str, Any] = {}) -> CallTracing | None:
    """The tracing of this worker, or None when the environment asks for none.

    Raises OtelConfigError when it asks for an exporter that is not installed or not known."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    asked = any(environ.get(key) for key in ENABLING) and names != ["none"]
    if not asked and "opentelemetry.trace" not in sys.modules:
        return None  # nothing could have set a provider: import nothing, cost nothing
    try:
        from opentelemetry import trace
    except ImportError:
        if asked:
            raise OtelConfigError(f"{_asking(environ)} asks for OpenTelemetry spans, but opentelemetry is "
                                  f"not installed: {EXTRA}") from None
        return None
    existing = trace.get_tracer_provider()
    if type(existing).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return CallTracing(existing.get_tracer("snakepit_bridge"))
    if not asked:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise OtelConfigError(f"{_asking(environ)} asks for OpenTelemetry spans, but opentelemetry-sdk is "
                              f"not installed: {EXTRA}") from None
    exporters = [_exporter(name, environ) for name in (names or ["otlp"]) if name != "none"]
    resource = Resource.create(dict(resource_attributes))
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER, else parent-based always-on
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # an adapter's trace.get_tracer() gets the same provider
    return CallTracing(provider.get_tracer("snakepit_bridge"), provider)


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    entry_name = name
    if name == "otlp":
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "http/protobuf").strip()
        if protocol not in OTLP_BY_PROTOCOL:
            raise OtelConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not one of "
                                  f"{', '.join(sorted(OTLP_BY_PROTOCOL))}")
        entry_name = OTLP_BY_PROTOCOL[protocol]
    found = [entry for entry in entry_points(group="opentelemetry_traces_exporter") if entry.name == entry_name]
    if not found:
        known = sorted({entry.name for entry in entry_points(group="opentelemetry_traces_exporter")} | {"otlp", "none"})
        if name == "otlp":
            package = "opentelemetry-exporter-" + entry_name.replace("_", "-")
            raise OtelConfigError(f"OTEL_TRACES_EXPORTER=otlp over {protocol} needs {package}: "
                                  f"{EXTRA if protocol == 'http/protobuf' else 'pip install ' + package}")
        raise OtelConfigError(f"OTEL_TRACES_EXPORTER: no exporter named {name!r} is installed "
                              f"(installed: {', '.join(known)})")
    return found[0].load()()


def _asking(environ: Mapping[str, str]) -> str:
    return next(f"{key}={environ[key]}" for key in ENABLING if environ.get(key))


def _metadata_value(context: Any, key: str) -> str:
    metadata = getattr(context, "invocation_metadata", None)
    for name, value in (metadata() or ()) if metadata is not None else ():
        if name == key:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return ""
