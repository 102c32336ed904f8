"""Prometheus metrics (`--metrics-port`): read from the server's own counters at scrape time, so a
tool call pays nothing for them beyond what GetStats already costs.

`prometheus_client` is an optional extra (`pip install snakepit_bridge[metrics]`), imported only when
the flag is set. Names follow Prometheus conventions (base units, `_total` counters):

    snakepit_tool_calls_total{tool, code}       calls that ended, by gRPC status name (refusals
                                                 before a tool ran count with tool="" unless the
                                                 tool exists)
    snakepit_tool_call_duration_seconds{tool}   histogram of calls that ran (admission to end)
    snakepit_requests_in_flight                 tool calls admitted and not ended
    snakepit_requests_queued                    tool calls waiting for a slot
    snakepit_admission_refusals_total{code}     calls refused before a tool ran
    snakepit_sessions                           sessions alive
    snakepit_max_workers                        tool calls the server runs at once
    snakepit_gil_enabled                        1 with the GIL on, 0 off
    snakepit_thread_safety_findings             the checker's findings (with --thread-safety-check)
    process_resident_memory_bytes, ...          prometheus_client's process collector
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

from ..threadsafety.interpreter import gil_enabled
from .stats import cumulative_at_powers_of_two

if TYPE_CHECKING:
    from .servicer import BridgeServicer

log = logging.getLogger("snakepit_bridge.server")

class BridgeCollector:
    """A prometheus_client collector over one servicer's counters."""

    def __init__(self, servicer: BridgeServicer) -> None:
        self.servicer = servicer

    def describe(self) -> list:
        return []  # unchecked collector: families are made at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        servicer = self.servicer
        snapshot = servicer.stats.snapshot()
        calls = CounterMetricFamily("snakepit_tool_calls", "Tool calls that ended, by tool and gRPC status",
                                    labels=["tool", "code"])
        for (tool, code), count in sorted(snapshot["outcomes"].items()):
            calls.add_metric([tool, code], count)
        yield calls

        durations = HistogramMetricFamily("snakepit_tool_call_duration_seconds",
                                          "Duration of tool calls that ran, from admission to their end",
                                          labels=["tool"])
        for tool, (count, total_seconds, histogram) in sorted(snapshot["tools"].items()):
            buckets = [(_format(upper), below) for upper, below in cumulative_at_powers_of_two(histogram)]
            buckets.append(("+Inf", count))
            durations.add_metric([tool], buckets, sum_value=total_seconds)
        yield durations

        refused = CounterMetricFamily("snakepit_admission_refusals", "Tool calls refused before a tool ran",
                                      labels=["code"])
        for code, count in sorted(snapshot["refusals"].items()):
            refused.add_metric([code], count)
        yield refused

        yield _gauge(GaugeMetricFamily, "snakepit_requests_in_flight", "Tool calls admitted and not ended",
                     snapshot["requests_active"])
        yield _gauge(GaugeMetricFamily, "snakepit_requests_queued", "Tool calls waiting for a slot",
                     snapshot["requests_queued"])
        yield _gauge(GaugeMetricFamily, "snakepit_sessions", "Sessions alive", len(servicer.sessions))
        yield _gauge(GaugeMetricFamily, "snakepit_max_workers", "Tool calls run at once", servicer.info.max_workers)
        yield _gauge(GaugeMetricFamily, "snakepit_gil_enabled", "1 when the GIL is on, 0 when off",
                     1 if gil_enabled() else 0)
        if servicer.checker is not None:
            try:
                findings = servicer.checker.get_report()["summary"]["findings"]
            except Exception:  # a report that cannot be read must not break the scrape
                log.exception("thread-safety report unreadable for metrics")
                findings = float("nan")
            yield _gauge(GaugeMetricFamily, "snakepit_thread_safety_findings",
                         "Findings of the ThreadSafetyChecker so far", findings)


def _gauge(family, name: str, documentation: str, value: float):
    gauge = family(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _format(seconds: float) -> str:
    return f"{seconds:.9g}"


def serve_metrics(servicer: BridgeServicer, host: str, port: int) -> int:
    """Serve /metrics on host:port in a daemon thread; returns the port (0 asks for a free one)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    registry.register(BridgeCollector(servicer))
    ProcessCollector(registry=registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
