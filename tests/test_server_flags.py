"""Command-line flags: --help, --mode, --elixir-address, --adapter, --log-level (and what the logs carry),
--max-message-mb."""
from __future__ import annotations

import itertools
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import ROOT, SCRIPTS, SHOWCASE, SPEC_ADAPTER, WorkerServer

COMMON_FLAGS = ["--adapter", "--host", "--port", "--elixir-address", "--mode", "--log-level", "--max-message-mb",
                "--auth-token-env", "--max-queue", "--grace", "--exit-on-stdin-eof", "--session-ttl", "--fork-server"]


def run_script(mode, *args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPTS[mode]), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("mode, own_flags, foreign_flags", [
    ("threaded", ["--max-workers", "--thread-safety-check"], ["--processes"]),
    ("process", ["--processes"], ["--max-workers", "--thread-safety-check"]),
])
def test_help_lists_every_flag_of_the_script(mode, own_flags, foreign_flags):
    result = run_script(mode, "--help")
    assert result.returncode == 0, result.stderr
    for flag in COMMON_FLAGS + own_flags:
        assert flag in result.stdout, f"{flag} missing from {mode} --help"
    for flag in foreign_flags:
        assert flag not in result.stdout
    assert "(default: 16)" in result.stdout if mode == "threaded" else True


@pytest.mark.parametrize("mode, other", [("threaded", "process"), ("process", "threaded")])
def test_mode_that_disagrees_with_the_script_is_a_clear_error(mode, other):
    result = run_script(mode, "--mode", other, "--port", "0")
    assert result.returncode == 2
    assert f"--mode {other}" in result.stderr and f"grpc_server_{other}.py" in result.stderr, result.stderr
    assert "SNAKEPIT_READY" not in result.stdout


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_mode_that_agrees_with_the_script_is_accepted(mode):
    with WorkerServer(mode, "--adapter", SHOWCASE, "--mode", mode) as server:
        assert server.client().ping().worker_mode == mode


@pytest.mark.parametrize("mode, flag", [("threaded", "--processes"), ("process", "--max-workers")])
def test_flag_of_the_other_server_is_refused(mode, flag):
    result = run_script(mode, flag, "2", "--port", "0")
    assert result.returncode == 2 and flag in result.stderr


def test_elixir_address_with_nothing_listening_is_accepted_and_never_fatal():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--elixir-address", "127.0.0.1:1") as server:
        assert server.client().execute("add", {"a": 2, "b": 2}) == 4
        assert server.terminate() == 0  # served, and stopped cleanly: the address never mattered


def test_elixir_address_is_never_dialled():
    # A listener of our own at the given address: over the server's whole life nothing connects to it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        with WorkerServer("threaded", "--adapter", SHOWCASE, "--elixir-address", address) as server:
            assert server.client().execute("add", {"a": 2, "b": 2}) == 4
            assert server.terminate() == 0
        assert any(address in line for line in server.stderr_lines)  # it was told the address
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize("adapter, words", [
    ("no_dots", ["module.Class"]),
    ("tests.no_such_module.Adapter", ["tests.no_such_module"]),
    ("tests.adapters_for_tests.Missing", ["Missing"]),
])
def test_bad_adapter_is_a_clear_error_and_exit_code_1(adapter, words):
    result = run_script("process", "--adapter", adapter, "--port", "0")
    assert result.returncode == 1
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_threaded_server_refuses_an_adapter_that_does_not_declare_thread_safety():
    result = run_script("threaded", "--adapter", "tests.adapters_for_tests.UndeclaredAdapter", "--port", "0")
    assert result.returncode == 1
    assert "__thread_safe__" in result.stderr and "grpc_server_process.py" in result.stderr
    with WorkerServer("process", "--adapter", "tests.adapters_for_tests.UndeclaredAdapter") as server:
        assert server.client().execute("noop") is None  # the process server runs it


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_invalid_numbers_are_refused_by_the_parser(value):
    result = run_script("threaded", "--max-workers", value, "--port", "0")
    assert result.returncode == 2 and "--max-workers" in result.stderr


# --- logs -------------------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - \[(?P<thread>[^\]]+)\] - (?P<level>[A-Z]+) - "
                      r"\[(?P<request>[^\]]+)\] (?P<message>.*)$")


def lines_for(server, request_id):
    """The log lines of `request_id`, once every line logged before this call has been read: a
    marker call logs a WARNING last, and stderr is one ordered pipe (read by a background thread)."""
    marker = f"log-marker-{next(_markers)}"
    with pytest.raises(grpc.RpcError):
        server.stub().ExecuteTool(pb.ExecuteToolRequest(tool_name="raise_tool_error", args_json='{"code": "ABORTED"}',
                                                        request_id=marker), timeout=10)
    deadline = time.monotonic() + 10
    while not any(f"[{marker}]" in line for line in list(server.stderr_lines)):
        assert time.monotonic() < deadline, f"the marker line {marker} never reached stderr"
        time.sleep(0.01)
    return [m for m in (LOG_LINE.match(line) for line in list(server.stderr_lines)) if m and m["request"] == request_id]


_markers = itertools.count()


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_debug_logs_carry_thread_name_and_request_id_one_line_per_request(mode):
    with WorkerServer(mode, "--adapter", SPEC_ADAPTER, "--log-level", "DEBUG") as server:
        stub = server.stub()
        stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop", request_id="log-req-1"), timeout=10)
        list(stub.ExecuteStreamingTool(pb.ExecuteToolRequest(tool_name="countdown", args_json='{"n": 3}',
                                                             request_id="log-req-2"), timeout=10))
        for request_id, tool in (("log-req-1", "noop"), ("log-req-2", "countdown")):
            lines = lines_for(server, request_id)
            assert len(lines) == 1, [m.group(0) for m in lines]
            line = lines[0]
            assert line["level"] == "DEBUG" and tool in line["message"]
            assert line["thread"].startswith("ThreadPoolExecutor-0_"), line.group(0)


def test_info_level_logs_no_line_per_successful_request_but_one_per_failure():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--log-level", "INFO") as server:
        stub = server.stub()
        stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop", request_id="quiet-1"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="stream_then_fail", request_id="loud-1"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="raise_tool_error", args_json='{"code": "INTERNAL"}',
                                                   request_id="loud-2"), timeout=10)
        assert lines_for(server, "quiet-1") == []
        loud = lines_for(server, "loud-2")
        assert len(loud) == 1 and loud[0]["level"] == "WARNING" and "raise_tool_error" in loud[0]["message"]
        assert not any(line.startswith("SNAKEPIT_READY") for line in server.stderr_lines)


# --- message size -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_messages():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-message-mb", "1") as server:
        yield server


def test_request_over_max_message_mb_is_resource_exhausted(small_messages):
    client = small_messages.client()
    with pytest.raises(BridgeCallError) as caught:
        client.execute("typed", {"i": 1, "f": 1.0, "flag": True, "s": "", "raw": b"x" * (2 * 1024 * 1024),
                                 "ints": [], "mapping": {}, "arr": []})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.execute("make_bytes", {"size": 512 * 1024}) == b"x" * 512 * 1024  # under the limit: fine


def test_response_over_max_message_mb_is_resource_exhausted_and_the_server_keeps_serving(small_messages):
    client = small_messages.client()
    with pytest.raises(BridgeCallError) as caught:
        client.execute("make_bytes", {"size": 2 * 1024 * 1024})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.execute("noop") is None and small_messages.process.poll() is None


def test_default_limit_carries_messages_beyond_grpcs_own_4_mib_default():
    with WorkerServer("process", "--adapter", SPEC_ADAPTER) as server:
        payload = bytes(range(256)) * (12 * 4096)  # 12 MiB
        got = server.client().execute("typed", {"i": 1, "f": 1.0, "flag": True, "s": "", "raw": payload, "ints": [],
                                                "mapping": {}, "arr": []})
        assert got["values"]["raw"] == payload


def test_thread_safety_check_flag_turns_the_checker_report_on():
    import json

    with WorkerServer("threaded", "--adapter", SHOWCASE, "--thread-safety-check") as server:
        client = server.client()
        assert client.execute("add", {"a": 1, "b": 2}) == 3
        report = json.loads(client.stats().thread_safety_json)
        assert report["enabled"] is True and SHOWCASE in report["tracked_adapters"]
    with WorkerServer("threaded", "--adapter", SHOWCASE) as server:
        assert server.client().stats().thread_safety_json == ""  # off unless asked for


def test_explicit_port_is_the_port_served():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--port", str(port)) as server:
        assert server.port == port
        assert server.client().ping().pid == server.pid
