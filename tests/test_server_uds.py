"""--uds PATH (and --host unix:PATH): real servers on a Unix domain socket, one server per path."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request

import grpc
import pytest

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import ROOT, SHOWCASE, SPEC_ADAPTER, WorkerServer, wait_until

MODES = ["threaded", "process"]
TRANSPORT_LINE = re.compile(r"\((?:threaded|process), .*, (\w+) transport\) on unix:")


@pytest.fixture
def socket_dir():
    """A short private directory: a Unix socket path has at most 107 bytes, and pytest's tmp_path can be longer."""
    directory = tempfile.mkdtemp(prefix="snakepit-uds-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def path(socket_dir):
    return os.path.join(socket_dir, "worker.sock")


def start_failing(mode: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a server that should refuse to start (it exits by itself); its command is WorkerServer's."""
    command = WorkerServer(mode, *args).command()
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert "SNAKEPIT_READY" not in result.stdout, result.stdout
    return result


def last_error_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def transport_of(server: WorkerServer) -> str:
    return server.stderr_match(TRANSPORT_LINE.pattern)[1]


# --- serving ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_ping_and_tool_calls_are_served_over_the_socket_named_by_the_ready_line(mode, path, socket_dir):
    ready_file = os.path.join(socket_dir, "ready")
    with WorkerServer(mode, "--adapter", SHOWCASE, "--uds", path, env={"SNAKEPIT_READY_FILE": ready_file}) as server:
        assert server.stdout_lines == [f"SNAKEPIT_READY uds={path} pid={server.process.pid}"]
        with open(ready_file) as handle:
            assert handle.read() == f"{path}\n"
        client = server.client()
        assert client.ping("over uds").message == "over uds"
        assert client.execute("add", {"a": 2, "b": 3}) == 5
        assert list(client.stream("progress", {"steps": 2}))
        assert client.stats().worker_mode == mode


def test_ready_line_carries_the_nonce_after_the_socket_path(path):
    nonce = "0123456789abcdef0123456789abcdef"
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--uds", path, env={"SNAKEPIT_READY_NONCE": nonce}) as server:
        assert server.stdout_lines == ["", f"SNAKEPIT_READY uds={path} pid={server.process.pid} nonce={nonce}"]


@pytest.mark.parametrize("spelling", ["unix:{path}", "unix://{path}"])
def test_host_unix_path_is_the_same_as_uds(spelling, path):
    with WorkerServer("process", "--adapter", SHOWCASE, "--host", spelling.format(path=path)) as server:
        assert server.uds == path
        assert server.client().execute("add", {"a": 1, "b": 1}) == 2


def test_a_relative_path_is_announced_as_an_absolute_one(path):
    relative = os.path.relpath(path, ROOT)  # the server runs in ROOT
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--uds", relative) as server:
        assert server.uds == path
        assert server.client().ping().pid == server.pid


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_lists_and_calls_the_services_over_the_socket(path):
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--uds", path) as server:
        listed = server.grpcurl("list")
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) >= {"snakepit.bridge.BridgeService", "grpc.health.v1.Health",
                                              "grpc.reflection.v1alpha.ServerReflection"}
        ping = server.grpcurl("snakepit.bridge.BridgeService/Ping", data='{"message": "hi"}')
        assert ping.returncode == 0, ping.stderr
        assert json.loads(ping.stdout)["message"] == "hi"
        health = server.grpcurl("grpc.health.v1.Health/Check", data="{}")
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["status"] == "SERVING"


def test_auth_token_is_required_over_the_socket_as_over_tcp(path):
    env = {"SNAKEPIT_TEST_TOKEN": "uds-secret"}
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--uds", path, "--auth-token-env", "SNAKEPIT_TEST_TOKEN",
                      env=env) as server:
        with pytest.raises(BridgeCallError) as refused:
            server.client().execute("add", {"a": 1, "b": 2})
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert server.client(token="uds-secret").execute("add", {"a": 1, "b": 2}) == 3


def test_metrics_stay_on_their_tcp_port_while_calls_go_over_the_socket(path):
    pytest.importorskip("prometheus_client")
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--uds", path, "--metrics-port", "0") as server:
        server.client().execute("noop")
        port = int(server.stderr_match(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    assert re.search(r'^snakepit_tool_calls_total\{code="OK",tool="noop"\} 1\.0$', text, re.M), text


def test_each_connection_to_the_socket_has_its_own_call_limit_on_grpclib_and_one_shared_limit_on_grpcio(path):
    """grpcio names every client of a Unix socket `unix:`, so --max-calls-per-connection counts them all
    together there (documented in the README); grpclib names each connection."""
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--uds", path, "--max-workers", "4",
                      "--max-calls-per-connection", "2") as server:
        own_connection = ("grpc.use_local_subchannel_pool", 1)
        greedy = server.stub(own_connection)
        sleeping = [greedy.ExecuteTool.future(pb.ExecuteToolRequest(tool_name="stubborn_sleep",
                                                                    args_json='{"seconds": 2}'), timeout=30)
                    for _ in range(2)]
        assert wait_until(lambda: server.client().stats().requests_active == 2)
        other = server.stub(own_connection)
        try:
            other.ExecuteTool(pb.ExecuteToolRequest(tool_name="noop"), timeout=10)
            refused = None
        except grpc.RpcError as error:
            refused = error
        for call in sleeping:
            call.result()
        if transport_of(server) == "grpclib":
            assert refused is None, refused
        else:
            assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max-calls-per-connection" in refused.details()


# --- one server per path -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_second_server_on_a_live_socket_fails_and_the_first_keeps_serving(mode, path):
    with WorkerServer(mode, "--adapter", SHOWCASE, "--uds", path) as first:
        inode = os.stat(path).st_ino
        second = start_failing(mode, "--adapter", SHOWCASE, "--uds", path)
        assert second.returncode == 1, second.stderr
        assert last_error_line(second) == (f"error: {path} is in use by another server "
                                           f"(pid {first.pid} holds {path}.lock)")
        assert os.stat(path).st_ino == inode and os.path.exists(f"{path}.lock")
        assert first.client().execute("add", {"a": 2, "b": 2}) == 4  # a new connection reaches the first


def test_a_live_socket_of_a_server_that_takes_no_lock_is_not_taken_over(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", path)
        assert result.returncode == 1, result.stderr
        assert last_error_line(result) == f"error: {path} is in use by another server (it accepts connections)"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(path)  # still the listener's socket
        probe.close()
        assert not os.path.exists(f"{path}.lock")
    finally:
        listener.close()


@pytest.mark.parametrize("mode", MODES)
def test_the_stale_socket_of_a_killed_server_is_reclaimed(mode, path):
    with WorkerServer(mode, "--adapter", SHOWCASE, "--uds", path) as killed:
        killed.process.kill()
        killed.process.wait(10)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind by kill -9, with its lock file
    assert os.path.exists(f"{path}.lock")
    with WorkerServer(mode, "--adapter", SHOWCASE, "--uds", path) as successor:
        assert successor.client().execute("add", {"a": 3, "b": 4}) == 7
        successor.stderr_match(re.escape(f"removed the stale socket {path}"))


def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(path):
    with open(path, "w") as handle:
        handle.write("precious")
    result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", path)
    assert result.returncode == 1
    assert last_error_line(result) == (f"error: --uds {path}: that path exists and is not a socket; "
                                       "remove it or choose another path")
    with open(path) as handle:
        assert handle.read() == "precious"


# --- the socket file ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_socket_and_lock_files_are_removed_at_a_clean_exit(mode, sig, path, socket_dir):
    with WorkerServer(mode, "--adapter", SHOWCASE, "--uds", path) as server:
        assert sorted(os.listdir(socket_dir)) == ["worker.sock", "worker.sock.lock"]
        assert server.terminate(sig) == 0
    assert os.listdir(socket_dir) == []


def test_socket_is_owner_only_whatever_the_umask(path):
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--uds", path, umask=0) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{path}.lock").st_mode) == 0o600
        assert server.client().ping().pid == server.pid


def test_a_start_up_that_fails_after_binding_leaves_no_socket_file(path, socket_dir):
    # --require-free-threading on a GIL build fails once the transport is listening
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        pytest.skip("the GIL is off here: --require-free-threading would start")
    result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", path, "--require-free-threading")
    assert result.returncode == 1
    assert "--require-free-threading" in last_error_line(result)
    assert os.listdir(socket_dir) == []


# --- flags that cannot work ------------------------------------------------------------------------------

def test_a_path_in_a_missing_directory_is_a_clear_error(socket_dir):
    missing = os.path.join(socket_dir, "no-such-dir")
    result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", os.path.join(missing, "w.sock"))
    assert result.returncode == 1
    assert last_error_line(result) == f"error: --uds {missing}/w.sock: the directory {missing} does not exist"


def test_processes_cannot_share_one_socket(path):
    result = start_failing("process", "--adapter", SHOWCASE, "--uds", path, "--processes", "2")
    assert result.returncode == 2
    assert "--processes 2 with --uds" in result.stderr and "start one worker per socket" in result.stderr
    assert not os.path.exists(path)


@pytest.mark.parametrize("flags, words", [
    (["--port", "50052"], "--port and --uds"),
    (["--host", "127.0.0.1"], "--host 127.0.0.1 and --uds"),
], ids=["port", "host"])
def test_uds_with_a_tcp_address_is_refused(flags, words, path):
    result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", path, *flags)
    assert result.returncode == 2
    assert words in result.stderr


def test_uds_given_twice_is_refused(path):
    result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", path, "--host", f"unix:{path}")
    assert result.returncode == 2
    assert "say the same thing twice" in result.stderr


@pytest.mark.parametrize("name, words", [
    ("x" * 120, "a Unix socket path may have at most 107"),
    ("with space.sock", "contains whitespace"),
], ids=["too-long", "whitespace"])
def test_a_path_that_cannot_be_a_socket_path_is_refused_by_the_parser(name, words, socket_dir):
    result = start_failing("threaded", "--adapter", SHOWCASE, "--uds", os.path.join(socket_dir, name))
    assert result.returncode == 2
    assert words in result.stderr

