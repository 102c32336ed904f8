"""Readiness, port clashes, and shutdown: SIGTERM/SIGINT drain, stdin EOF."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SHOWCASE, SPEC_ADAPTER, ServerFailedToStart, WorkerServer, pid_alive, wait_until

MODES = [("threaded", []), ("process", []), ("process", ["--processes", "2"])]
MODE_IDS = ["threaded", "process", "preforked"]


# --- readiness -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, flags", MODES, ids=MODE_IDS)
def test_ready_line_names_the_port_and_pid_and_is_alone_on_stdout(mode, flags, tmp_path):
    ready_file = tmp_path / "ready"
    with WorkerServer(mode, "--adapter", SHOWCASE, *flags, env={"SNAKEPIT_READY_FILE": str(ready_file)}) as server:
        assert server.stdout_lines == [f"SNAKEPIT_READY port={server.port} pid={server.process.pid}"]
        assert server.port > 0 and server.pid == server.process.pid
        assert ready_file.read_text() == f"{server.port}\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]  # the temporary file was renamed away
        assert server.client().execute("add", {"a": 1, "b": 2}) == 3  # ready means serving


@pytest.mark.parametrize("mode, flags", MODES, ids=MODE_IDS)
def test_ready_line_carries_the_spawners_nonce_on_a_line_of_its_own_and_the_adapter_never_sees_it(mode, flags):
    nonce = "5f0c1e9a7b3d4c2e8a6b0d1f2e3c4b5a"
    with WorkerServer(mode, "--adapter", SPEC_ADAPTER, *flags, env={"SNAKEPIT_READY_NONCE": nonce}) as server:
        # the leading empty line ends whatever partial line the adapter's setup() left on stdout
        assert server.stdout_lines == ["", f"SNAKEPIT_READY port={server.port} pid={server.process.pid} nonce={nonce}"]
        assert server.client().execute("environment_variable", {"name": "SNAKEPIT_READY_NONCE"}) is None


@pytest.mark.parametrize("mode, flags", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("adapter, last_line", [
    ("tests.adapters_for_tests.FailingSetupAdapter", "adapter setup failed: RuntimeError: model file missing"),
    ("tests.adapter_raising_at_import.Anything",
     "cannot import adapter module 'tests.adapter_raising_at_import': RuntimeError: no GPU visible at import time"),
    ("tests.no_such_module.Anything",
     "cannot import adapter module 'tests.no_such_module': No module named 'tests.no_such_module'"),
], ids=["setup-raises", "import-raises", "import-missing"])
def test_adapter_that_fails_to_load_ends_start_up_with_one_error_line_and_exit_code_1(mode, flags, adapter, last_line):
    code, stdout, stderr = start_expecting_failure(mode, "--adapter", adapter, *flags)
    assert code == 1, (stdout, stderr)
    assert stderr.splitlines()[-1].startswith("error: ") and stderr.splitlines()[-1].endswith(last_line), stderr
    assert "SNAKEPIT_READY" not in stdout


def test_ready_file_is_written_atomically_never_empty(tmp_path):
    """A watcher polling the file sees either nothing or the whole port number."""
    ready_file = tmp_path / "ready"
    seen: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(ready_file.read_text())
            except FileNotFoundError:
                pass
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with WorkerServer("threaded", "--adapter", SHOWCASE, env={"SNAKEPIT_READY_FILE": str(ready_file)}) as server:
            assert wait_until(lambda: bool(seen))
            port = server.port
    finally:
        stop.set()
        watcher.join()
    assert set(seen) == {f"{port}\n"}


def occupied_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def start_expecting_failure(mode, *args, timeout=30):
    """Start a server that should refuse to start: returns (exit code, stdout, stderr). One that
    announces readiness anyway is stopped at once and reported with exit code None."""
    server = WorkerServer(mode, *args, startup_timeout=timeout)
    try:
        server.start()
    except ServerFailedToStart:
        server.process.wait(10)
        time.sleep(0.2)  # let the stderr reader catch the last lines
        return server.process.returncode, "\n".join(server.stdout_lines), "\n".join(server.stderr_lines)
    server.__exit__(None, None, None)
    return None, "\n".join(server.stdout_lines), "\n".join(server.stderr_lines)


@pytest.mark.parametrize("mode, flags", MODES, ids=MODE_IDS)
def test_port_already_in_use_is_a_clear_error_and_exit_code_1(mode, flags):
    sock, port = occupied_port()
    try:
        code, stdout, stderr = start_expecting_failure(mode, "--adapter", SHOWCASE, "--port", str(port), *flags)
    finally:
        sock.close()
    assert code == 1, (stdout, stderr)
    assert str(port) in stderr and ("in use" in stderr or "cannot listen" in stderr), stderr
    assert "SNAKEPIT_READY" not in stdout
    assert "Traceback" not in stderr


@pytest.mark.parametrize("mode, flags", MODES, ids=MODE_IDS)
def test_port_held_by_another_worker_server_is_a_clear_error_and_exit_code_1(mode, flags):
    with WorkerServer(mode, "--adapter", SHOWCASE, *flags) as first:
        code, stdout, stderr = start_expecting_failure(mode, "--adapter", SHOWCASE, "--port", str(first.port), *flags)
        assert code == 1, f"a second server on port {first.port} exited with {code}: {stdout!r} {stderr!r}"
        assert str(first.port) in stderr and "SNAKEPIT_READY" not in stdout
        assert first.client().ping().pid  # the first server is untouched


# --- shutdown ------------------------------------------------------------------------------------------

def watch_health(channel):
    """Health Watch responses of the whole server, collected in a list by a background thread."""
    statuses: list[int] = []
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def collect():
        try:
            for response in call:
                statuses.append(response.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=collect, daemon=True).start()
    return call, statuses


@pytest.mark.parametrize("mode, flags, sig", [(*m, signal.SIGTERM) for m in MODES] + [
    ("threaded", [], signal.SIGINT), ("process", ["--processes", "2"], signal.SIGINT)],
    ids=[f"SIGTERM-{i}" for i in MODE_IDS] + ["SIGINT-threaded", "SIGINT-preforked"])
def test_signal_drains_the_in_flight_call_refuses_new_ones_and_exits_0(mode, flags, sig, tmp_path):
    teardown_file = tmp_path / "teardown"
    server = WorkerServer(mode, "--adapter", SPEC_ADAPTER, "--grace", "10", *flags,
                          env={"SPEC_ADAPTER_TEARDOWN_FILE": str(teardown_file)})
    with server:
        client = server.client()
        stub = server.stub()  # one channel, one connection: with --processes, one worker process
        pid = stub.Ping(pb.PingRequest(), timeout=10).pid
        in_flight = stub.ExecuteTool.future(pb.ExecuteToolRequest(
            tool_name="stubborn_sleep", args_json='{"seconds": 1.5}'), timeout=30)
        assert wait_until(lambda: stub.GetStats(pb.GetStatsRequest(), timeout=5).requests_active == 1)
        watch, statuses = watch_health(server.channel())
        assert wait_until(lambda: statuses == [health_pb2.HealthCheckResponse.SERVING])
        signalled = time.monotonic()
        server.process.send_signal(sig)
        if not flags:  # single process: health turns NOT_SERVING and new calls are refused at once
            assert wait_until(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in statuses, timeout=5), statuses
            watch.cancel()
            with pytest.raises(BridgeCallError) as caught:
                client.execute("noop", timeout=5)
            assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), caught.value
        else:
            watch.cancel()
        response = in_flight.result(timeout=15)
        assert json.loads(response.result_json)["slept"] >= 1.49  # it ran to the end
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 8.0  # it did not sit out the whole --grace
        assert not pid_alive(pid)
    if not flags:
        assert teardown_file.read_text() == "teardown\n"  # teardown ran after the drain


def test_calls_still_running_when_the_grace_period_ends_are_cut_off_and_the_server_exits_0():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--grace", "0.5") as server:
        stub = server.stub()
        in_flight = stub.ExecuteTool.future(pb.ExecuteToolRequest(
            tool_name="stubborn_sleep", args_json='{"seconds": 6}'), timeout=30)
        assert wait_until(lambda: server.client().stats().requests_active == 1)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError):
            in_flight.result(timeout=15)
        assert server.process.wait(timeout=15) == 0
        exited_after = time.monotonic() - signalled
        assert exited_after < 4.0, f"exited {exited_after:.1f} s after SIGTERM with --grace 0.5 (the call needed 6 s)"


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_an_exit_that_hangs_after_shutdown_ends_within_its_timeout_with_every_threads_stack(mode):
    # The adapter's non-daemon thread never ends, so the interpreter's exit would wait for it forever.
    with WorkerServer(mode, "--adapter", "tests.adapters_for_tests.NeverEndingThreadAdapter",
                      env={"PYTHONFAULTHANDLER": ""}) as server:  # only the server's own watchdog dumps stacks
        assert server.client().execute("noop") is None
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 1
        exited_after = time.monotonic() - signalled
        server.read_to_the_end()
    assert 4.0 < exited_after < 15.0, f"exited {exited_after:.1f} s after SIGTERM (exit timeout 5 s)"
    log = "\n".join(server.stderr_lines)
    assert "stopped" in log  # the shutdown itself was complete; only the interpreter's exit hung
    assert "Timeout (0:00:05)!" in log
    assert "in wait_for_a_stop_that_never_comes" in log  # the thread that held the exit, by its function


@pytest.mark.parametrize("mode, flags", MODES, ids=MODE_IDS)
def test_stdin_eof_shuts_the_server_down_with_exit_0(mode, flags):
    with WorkerServer(mode, "--adapter", SHOWCASE, "--exit-on-stdin-eof", *flags) as server:
        pid = server.client().ping().pid
        server.process.stdin.close()
        assert server.process.wait(timeout=15) == 0
        assert wait_until(lambda: not pid_alive(pid), timeout=10)


def test_without_the_flag_stdin_eof_does_not_stop_the_server():
    with WorkerServer("threaded", "--adapter", SHOWCASE) as server:
        server.process.stdin.close()
        time.sleep(1.0)
        assert server.process.poll() is None
        assert server.client().execute("add", {"a": 1, "b": 1}) == 2


def test_stdin_eof_lets_the_in_flight_call_finish():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--exit-on-stdin-eof") as server:
        in_flight = server.stub().ExecuteTool.future(pb.ExecuteToolRequest(
            tool_name="stubborn_sleep", args_json='{"seconds": 1.0}'), timeout=30)
        assert wait_until(lambda: server.client().stats().requests_active == 1)
        server.process.stdin.close()
        assert "slept" in in_flight.result(timeout=15).result_json
        assert server.process.wait(timeout=15) == 0


def test_preforked_children_die_with_a_killed_parent():
    with WorkerServer("process", "--adapter", SHOWCASE, "--processes", "2") as server:
        children = set()
        for _ in range(24):
            children.add(server.stub(("grpc.use_local_subchannel_pool", 1)).Ping(pb.PingRequest(), timeout=10).pid)
            if len(children) == 2:
                break
        assert children and server.pid not in children
        server.process.kill()
        server.process.wait(10)
        assert wait_until(lambda: not any(pid_alive(pid) for pid in children), timeout=15)


def test_open_health_watch_stream_does_not_hold_shutdown_for_the_whole_grace_period():
    """gRPC clients with client-side health checking keep a Health/Watch stream open for good; with no tool
    call in flight, SIGTERM should not wait the whole --grace for that stream to end."""
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--grace", "8") as server:
        watch, statuses = watch_health(server.channel())
        assert wait_until(lambda: statuses == [health_pb2.HealthCheckResponse.SERVING])
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in statuses, timeout=5), statuses
        assert server.process.wait(timeout=20) == 0
        exited_after = time.monotonic() - signalled
        watch.cancel()
        assert exited_after < 4.0, f"exited {exited_after:.1f} s after SIGTERM: the idle Watch stream held the drain"
