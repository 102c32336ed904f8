"""--metrics-port: Prometheus metrics over real HTTP, parsed with prometheus_client's own parser."""
from __future__ import annotations

import re
import sys
import urllib.request

import pytest

from snakepit_bridge.client import BridgeCallError
from tests.servers import ROOT, SCRIPTS, SPEC_ADAPTER, WorkerServer

parser = pytest.importorskip("prometheus_client.parser")
METRICS_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def metrics_port(server: WorkerServer) -> int:
    return int(server.stderr_match(METRICS_LINE.pattern)[1])


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_calls_by_tool_and_status_and_time_them():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--metrics-port", "0", "--max-workers", "3") as server:
        port = metrics_port(server)
        client = server.client()
        for _ in range(3):
            client.execute("noop")
        with pytest.raises(BridgeCallError):
            client.execute("raise_tool_error", {"code": "ABORTED"})
        with pytest.raises(BridgeCallError):
            client.execute("no_such_tool")
        with pytest.raises(BridgeCallError):
            client.execute("noop", {"unexpected": 1})
        samples = scrape(port)
    assert value(samples, "snakepit_tool_calls_total", tool="noop", code="OK") == 3
    assert value(samples, "snakepit_tool_calls_total", tool="raise_tool_error", code="ABORTED") == 1
    # a refused call: a made-up tool name is no label, a known one is
    assert value(samples, "snakepit_tool_calls_total", tool="", code="NOT_FOUND") == 1
    assert value(samples, "snakepit_tool_calls_total", tool="noop", code="INVALID_ARGUMENT") == 1
    assert value(samples, "snakepit_admission_refusals_total", code="NOT_FOUND") == 1
    assert value(samples, "snakepit_admission_refusals_total", code="INVALID_ARGUMENT") == 1
    assert value(samples, "snakepit_tool_call_duration_seconds_count", tool="noop") == 3
    assert value(samples, "snakepit_tool_call_duration_seconds_bucket", tool="noop", le="+Inf") == 3
    assert 0 < value(samples, "snakepit_tool_call_duration_seconds_sum", tool="noop") < 5
    buckets = sorted((float(dict(labels)["le"]), count) for (name, labels), count in samples.items()
                     if name == "snakepit_tool_call_duration_seconds_bucket" and dict(labels)["tool"] == "noop")
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)  # cumulative
    assert value(samples, "snakepit_max_workers") == 3
    assert value(samples, "snakepit_requests_in_flight") == 0
    assert value(samples, "snakepit_gil_enabled") in (0, 1)
    assert value(samples, "process_resident_memory_bytes") > 1e6


def test_metrics_show_calls_in_flight_and_checker_findings():
    with WorkerServer("threaded", "--adapter", "tests.thread_safety_corpus.racy.UnlockedCounter",
                      "--thread-safety-check", "--metrics-port", "0", "--max-workers", "4") as server:
        port = metrics_port(server)
        client = server.client()
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: client.execute("increment"), range(40)))
        samples = scrape(port)
    assert value(samples, "snakepit_tool_calls_total", tool="increment", code="OK") == 40
    assert value(samples, "snakepit_thread_safety_findings") >= 1


def test_metrics_are_off_by_default_and_a_taken_port_is_a_start_up_error():
    with WorkerServer("threaded") as server:
        assert not any("metrics on" in line for line in server.stderr_lines)
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            import subprocess

            run = subprocess.run([sys.executable, str(SCRIPTS["threaded"]), "--port", "0", "--metrics-port",
                                  str(taken.getsockname()[1])], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    assert "error: --metrics-port: cannot listen on 127.0.0.1:" in run.stderr


def test_metrics_with_several_preforked_processes_is_refused_with_a_reason():
    import subprocess

    run = subprocess.run([sys.executable, str(SCRIPTS["process"]), "--processes", "2", "--metrics-port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode == 2 and "--metrics-port serves one process's counters" in run.stderr
