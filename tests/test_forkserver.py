"""The fork server (`--fork-server`, snakepit_bridge/server/forkserver.py): workers forked on request
serve like script-started ones, their output and deaths reach the pool at once, and nothing outlives
the pool."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from snakepit_bridge.server.forkserver_protocol import LineSplitter, RequestReader, parse_request
from tests.servers import ROOT, SCRIPTS, SPEC_ADAPTER, ForkServer, pid_alive, wait_until

PRELOADED = "tests.adapters_for_tests.PreloadedSpecAdapter"


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if parent_of(int(entry)) == pid and pid_alive(int(entry)):
                    found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def pipe_inodes(pid: int) -> dict[int, str]:
    """fd -> 'pipe:[inode]' for each pipe the process holds."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("pipe:"):
            fds[int(fd)] = target
    return fds


# --- serving ------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", [None, "grpclib"], ids=["default-transport", "grpclib"])
@pytest.mark.parametrize("mode", ["process", "threaded"])
def test_two_forked_workers_serve_calls_each_in_a_process_of_its_own(mode, transport):
    with ForkServer(mode, "--adapter", SPEC_ADAPTER, transport=transport) as fork_server:
        workers = [fork_server.spawn(id, "--port", "0") for id in ("w1", "w2")]
        infos = []
        for worker in workers:
            client = worker.client()
            assert client.ping("hello").message.endswith("hello")
            infos.append(client.execute("instance_info"))
            assert parent_of(worker.pid) == fork_server.pid
        assert [info["pid"] for info in infos] == [worker.pid for worker in workers]
        assert workers[0].port != workers[1].port
        stats = workers[0].client().stats()
        assert stats.worker_mode == mode


def test_a_forked_worker_has_only_its_own_pipes(tmp_path):
    """Its stdin, stdout and stderr are its own pipes; it holds none of the fork server's (stdin, events)
    nor another child's."""
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        first = fork_server.spawn("w1")
        second = fork_server.spawn("w2")
        server_pipes = set(pipe_inodes(fork_server.pid).values())
        for worker, other in ((first, second), (second, first)):
            pipes = pipe_inodes(worker.pid)
            assert sorted(pipes) == [0, 1, 2], pipes
            assert not set(pipes.values()) & set(pipe_inodes(other.pid).values())
            assert set(pipes.values()) <= server_pipes  # the fork server holds their other ends
        assert set(pipe_inodes(fork_server.pid)) >= {3, 4}  # its own stdin and stdout copies stay its own


def test_setup_runs_in_each_child_after_its_fork_by_default():
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        infos = []
        for id in ("w1", "w2"):
            requested = time.time()
            info = fork_server.spawn(id).client().execute("instance_info")
            assert info["setup_calls"] == 1
            assert info["setup_finished_unix"] > requested
            infos.append(info)
        assert infos[0]["setup_finished_unix"] != infos[1]["setup_finished_unix"]


def test_an_adapter_that_opts_in_to_preloading_is_set_up_once_in_the_fork_server_and_torn_down_there(tmp_path):
    teardowns = tmp_path / "teardowns"
    env = {"SPEC_ADAPTER_TEARDOWN_FILE": str(teardowns)}
    with ForkServer("process", "--adapter", PRELOADED, env=env) as fork_server:
        ready_at = time.time()
        workers = [fork_server.spawn(id) for id in ("w1", "w2")]
        infos = [worker.client().execute("instance_info") for worker in workers]
        assert [info["setup_calls"] for info in infos] == [1, 1]
        assert infos[0]["setup_finished_unix"] == infos[1]["setup_finished_unix"] < ready_at
        assert {info["pid"] for info in infos} == {workers[0].pid, workers[1].pid}
        fork_server.close_stdin()
        assert fork_server.process.wait(10) == 0
    assert teardowns.read_text().split() == [str(fork_server.pid)]


def test_each_child_draws_its_own_numpy_legacy_random_numbers():
    """The legacy global generator was seeded in the fork server; a child reseeds it, as a fresh worker has."""
    with ForkServer("process", "--adapter", PRELOADED) as fork_server:
        draws = {fork_server.spawn(id).client().execute("legacy_random") for id in ("w1", "w2")}
        assert len(draws) == 2


# --- readiness --------------------------------------------------------------------------------------

def test_the_ready_line_carries_the_requests_nonce_and_the_adapter_sees_neither_it_nor_the_fork_servers():
    nonce = "5f0c1e9a7b3d4c2e8a6b0d1f2e3c4b5a"
    env = {"SNAKEPIT_READY_NONCE": "forkserver-nonce"}
    with ForkServer("process", "--adapter", SPEC_ADAPTER, env=env) as fork_server:
        assert fork_server.lines[:2] == ["", f"SNAKEPIT_FORKSERVER_READY pid={fork_server.pid} nonce=forkserver-nonce"]
        worker = fork_server.spawn("w1", "--port", "0", nonce=nonce, env={"SPEC_VARIABLE": "from the request"})
        assert worker.ready_line == f"SNAKEPIT_READY port={worker.port} pid={worker.pid} nonce={nonce}"
        assert [kind for kind, text in fork_server.events_of("w1") if kind == "out"] == ["out", "out"]  # "" first
        client = worker.client()
        assert client.execute("environment_variable", {"name": "SNAKEPIT_READY_NONCE"}) is None
        assert client.execute("environment_variable", {"name": "SPEC_VARIABLE"}) == "from the request"


def test_forked_workers_serve_on_unix_sockets_and_remove_them_at_exit(tmp_path):
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        paths = [str(tmp_path / f"{id}.sock") for id in ("w1", "w2")]
        workers = [fork_server.spawn(id, "--uds", path) for id, path in zip(("w1", "w2"), paths)]
        assert [worker.uds for worker in workers] == paths
        for worker in workers:
            assert worker.client().execute("instance_info")["pid"] == worker.pid
        fork_server.request("signal w1 SIGTERM")
        assert fork_server.wait_exit("w1") == 0
        assert not os.path.exists(paths[0]) and os.path.exists(paths[1])


# --- output relayed -------------------------------------------------------------------------------

@pytest.mark.parametrize("stream, kind", [("stdout", "out"), ("stderr", "err")])
def test_a_childs_lines_are_relayed_whole_and_a_huge_line_is_cut_to_16_kib(stream, kind):
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        client = fork_server.spawn("w1").client()
        client.execute("print_line", {"size": 5000, "stream": stream, "char": "a"})
        client.execute("print_line", {"size": 100_000, "stream": stream, "char": "b"})
        assert fork_server.wait_event(lambda e: e[0] == "w1" and e[2].startswith("b"), 10)
        texts = [text for k, text in fork_server.events_of("w1") if k == kind and text[:1] in ("a", "b")]
        assert texts == ["a" * 5000, "b" * 16384 + f"...({100_000 - 16384} more bytes)"]


# --- deaths and errors ------------------------------------------------------------------------------

def test_a_child_killed_with_sigkill_is_reported_with_its_signal_at_once_and_the_fork_server_keeps_serving():
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        worker = fork_server.spawn("w1")
        killed = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        assert fork_server.wait_exit("w1", timeout=5) == -signal.SIGKILL
        assert time.monotonic() - killed < 1.0
        again = fork_server.spawn("w1")  # the id is free again
        assert again.pid != worker.pid
        assert again.client().execute("instance_info")["pid"] == again.pid


def test_signal_requests_reach_the_child():
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        fork_server.spawn("w1")
        fork_server.spawn("w2")
        fork_server.request("signal w1 SIGTERM")
        fork_server.request("signal w2 SIGKILL")
        assert fork_server.wait_exit("w1") == 0  # a graceful shutdown
        assert fork_server.wait_exit("w2") == -signal.SIGKILL
        assert any("shutting down (SIGTERM)" in text for kind, text in fork_server.events_of("w1") if kind == "err")


def test_bad_request_lines_get_an_error_event_each_and_the_fork_server_keeps_serving():
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        fork_server.spawn("busy")
        bad = [
            ("bogus w1", "-", "unknown request 'bogus'"),
            ("spawn", "-", "the id is missing"),
            ("spawn error {}", "-", "bad id 'error'"),
            ("spawn w1 {not json", "w1", "not JSON"),
            ('spawn w1 ["--port", "0"]', "w1", "must be a JSON object"),
            ('spawn w1 {"argv": []}', "w1", "unknown keys ['argv']"),
            ('spawn w1 {"args": ["--no-such-flag"]}', "w1", "unrecognized arguments: --no-such-flag"),
            ('spawn w1 {"args": ["--port", "0", "--processes", "2"]}', "w1", "--processes 2 with --fork-server"),
            ('spawn w1 {"env": {"A=B": "x"}}', "w1", '"env" must map variable names'),
            ('spawn busy {"args": ["--port", "0"]}', "busy", "a child with that id is running"),
            ("signal nobody SIGTERM", "nobody", "no running child has that id"),
            ("signal busy SIGFOO", "busy", "'SIGFOO' is not a signal name"),
        ]
        for line, _, _ in bad:
            fork_server.request(line)
        fork_server.request(b"x" * (1 << 20) + b"y\n")
        fork_server.request(b"spawn \xff\n")
        expected = [(id, message) for _, id, message in bad] + [
            ("-", "a request line longer than 1048576 bytes"), ("-", "a request line must be UTF-8")]
        assert fork_server.wait_event(lambda e: e[0] == "error" and "UTF-8" in e[2], 10)
        errors = [(id, message) for first, id, message in fork_server.events if first == "error"]
        assert len(errors) == len(expected), errors
        for (id, message), (expected_id, expected_text) in zip(errors, expected):
            assert id == expected_id and expected_text in message, (id, message)
        assert fork_server.spawn("w1").client().execute("instance_info")["setup_calls"] == 1


def test_a_child_whose_start_up_fails_reports_its_error_line_then_its_exit_code_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ForkServer("process", "--adapter", "tests.adapters_for_tests.FailingSetupAdapter") as fork_server:
            fork_server.request_spawn("w1", "--port", "0")
            assert fork_server.wait_exit("w1") == 1
            errors = [text for kind, text in fork_server.events_of("w1") if kind == "err" and text.startswith("error:")]
            assert errors == ["error: adapter setup failed: RuntimeError: model file missing"]
            assert fork_server.events_of("w1")[-1] == ("exit", "1")  # after all of its output
        with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
            fork_server.request_spawn("w1", "--port", str(port))
            assert fork_server.wait_exit("w1") == 1
            assert any(text.startswith("error: cannot listen on") for kind, text in fork_server.events_of("w1"))


@pytest.mark.parametrize("adapter, message", [
    ("tests.adapter_raising_at_import.Anything", "error: cannot import adapter module "
     "'tests.adapter_raising_at_import': RuntimeError: no GPU visible at import time"),
    ("tests.no_such_module.Anything",
     "error: cannot import adapter module 'tests.no_such_module': No module named 'tests.no_such_module'"),
    ("tests.adapters_for_tests.FailingPreloadAdapter", "error: adapter setup failed: RuntimeError: model file missing"),
], ids=["import-raises", "import-missing", "preloaded-setup-raises"])
def test_a_fork_server_that_cannot_start_prints_one_error_line_and_exits_1(adapter, message):
    with ForkServer("process", "--adapter", adapter, expect_ready=False) as fork_server:
        assert fork_server.process.wait(30) == 1
        assert fork_server.wait_line(lambda line: False, timeout=5) is None  # stdout read to its end
        assert fork_server.lines == [message]


# --- nothing outlives the pool --------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["stdin EOF", "SIGTERM"])
def test_stopping_the_fork_server_stops_every_child_and_leaves_no_process(stop):
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        workers = [fork_server.spawn(id) for id in ("w1", "w2")]
        if stop == "SIGTERM":
            fork_server.process.send_signal(signal.SIGTERM)
        else:
            fork_server.close_stdin()
        assert fork_server.process.wait(10) == 0
        assert [fork_server.wait_exit(worker.id, 0) for worker in workers] == [0, 0]
        assert not any(pid_alive(worker.pid) for worker in workers)


def test_the_pools_death_leaves_no_python_process_within_5_s_even_with_a_call_in_flight():
    """The BEAM killed -9: the kernel closes the fork server's stdin. A child draining a call that
    ignores cancellation (--grace 30) is killed once the fork server's 2 s are up."""
    with ForkServer("process", "--adapter", SPEC_ADAPTER, "--grace", "30") as fork_server:
        workers = [fork_server.spawn(id) for id in ("w1", "w2")]
        future = workers[0].client().stub.ExecuteTool.future(_stubborn_request(), timeout=60)
        assert wait_until(lambda: workers[0].client().stats().requests_active == 1, 10)
        closed = time.monotonic()
        fork_server.close_stdin()
        assert wait_until(lambda: not any(pid_alive(pid) for pid in (fork_server.pid, *[w.pid for w in workers])), 5)
        assert time.monotonic() - closed < 5
        assert fork_server.wait_exit("w1", 0) == -signal.SIGKILL
        future.cancel()


BEAM_STAND_IN = """
import json, subprocess, sys, time
fork_server = subprocess.Popen([sys.executable, sys.argv[1], "--fork-server", "--adapter", sys.argv[2]],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
fork_server.stdout.readline()
fork_server.stdin.write(b'spawn w1 {"args": ["--port", "0"]}\\n')
fork_server.stdin.flush()
child = None
for line in fork_server.stdout:
    words = line.decode().split()
    if words[1] == "spawned":
        child = int(words[2])
    if "SNAKEPIT_READY" in words:
        break
print(json.dumps([fork_server.pid, child]), flush=True)
time.sleep(60)
"""


def test_a_pool_killed_with_sigkill_leaves_no_python_process_within_5_s():
    """A stand-in for the BEAM holds the fork server's stdin and stdout, as an Erlang port does, and is killed -9."""
    beam = subprocess.Popen([sys.executable, "-c", BEAM_STAND_IN, str(SCRIPTS["process"]), SPEC_ADAPTER], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        ready = select.select([beam.stdout], [], [], 30)[0]
        assert ready, "the stand-in's fork server did not fork a ready worker within 30 s"
        pids = json.loads(beam.stdout.readline())
        assert all(pid_alive(pid) for pid in pids)
        beam.kill()
        killed = time.monotonic()
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5), [pid_alive(pid) for pid in pids]
        assert time.monotonic() - killed < 5
    finally:
        beam.kill()
        beam.wait(10)


def test_a_fork_server_killed_with_sigkill_takes_its_children_with_it_within_5_s():
    with ForkServer("process", "--adapter", SPEC_ADAPTER) as fork_server:
        workers = [fork_server.spawn(id) for id in ("w1", "w2")]
        fork_server.process.kill()
        assert wait_until(lambda: not any(pid_alive(worker.pid) for worker in workers), 5)
        assert children_of(fork_server.pid) == []


def _stubborn_request():
    from snakepit_bridge.generated import snakepit_bridge_pb2 as pb

    return pb.ExecuteToolRequest(tool_name="stubborn_sleep", args_json='{"seconds": 30}')


# --- the protocol's lines ---------------------------------------------------------------------------

def test_line_splitter_keeps_lines_across_reads_and_bounds_a_long_one():
    splitter = LineSplitter(limit=8)
    assert splitter.feed(b"ab") == []
    assert splitter.feed(b"c\n\nxyz") == [b"abc", b""]
    assert splitter.feed(b"0123456789\nend") == [b"xyz01234...(5 more bytes)"]
    assert splitter.finish() == [b"end"]
    assert splitter.finish() == []


def test_request_reader_drops_an_overlong_line_whole_and_reports_it_once():
    reader = RequestReader(limit=10)
    assert reader.feed(b"signal a SIGTERM"[:5]) == []
    first = reader.feed(b"x" * 20)
    assert [type(item).__name__ for item in first] == ["BadRequest"]
    assert reader.feed(b"yyyy") == []
    assert reader.feed(b"\n\nok 1\n") == [b"ok 1"]
    assert reader.feed(b"last") == [] and reader.finish() == [b"last"]


def test_parse_request_reads_spawn_and_signal():
    spawn = parse_request(b'spawn w-1 {"args": ["--uds", "/tmp/w.sock"], "env": {"A": "1"}, "nonce": "n1"}')
    assert (spawn.id, spawn.args, spawn.env, spawn.nonce) == ("w-1", ("--uds", "/tmp/w.sock"), {"A": "1"}, "n1")
    assert parse_request(b"spawn w2").args == ()
    assert parse_request(b"signal w2 SIGKILL").signum == signal.SIGKILL


def test_a_child_whose_parent_died_before_it_asked_for_the_parent_death_signal_exits_at_once():
    """parent_death.die_with_parent: when the parent it expects is not its parent any more (pid 1 never
    is this test's child's parent), it exits 1 instead of serving; with the right parent it carries on."""
    def run_expecting(parent: str) -> tuple[int, str]:
        code = ("import os, sys; sys.path.insert(0, sys.argv[1])\n"
                "from snakepit_bridge.server.parent_death import die_with_parent\n"
                f"die_with_parent(9, {parent})\n"
                "print('still running')\n")
        result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=30)
        return result.returncode, result.stdout

    assert run_expecting("1") == (1, "")
    assert run_expecting("os.getppid()") == (0, "still running\n")
