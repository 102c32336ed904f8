"""How many tool calls run at once: --max-workers on the threaded server, one per process on the process
server, --max-queue past which calls are RESOURCE_EXHAUSTED, and control RPCs that never wait.

Timing bounds are generous (a loaded 2-core machine): concurrent work must beat the serial time by a
wide margin, serialised work must not finish faster than physically possible.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SHOWCASE, SPEC_ADAPTER, WorkerServer, wait_until

OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def timed_sleeps(client_factory, count, seconds, timeout=30):
    """Run `count` sleep calls at once; returns (wall seconds, results)."""
    with ThreadPoolExecutor(count) as pool:
        started = time.monotonic()
        futures = [pool.submit(client_factory(i).execute, "sleep", {"seconds": seconds}, timeout=timeout)
                   for i in range(count)]
        results = [f.result() for f in futures]
        return time.monotonic() - started, results


# --- threaded server -----------------------------------------------------------------------------

def test_threaded_server_runs_four_half_second_calls_at_once():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--max-workers", "4") as server:
        client = server.client()
        client.execute("sleep", {"seconds": 0.0})  # warm the connection
        elapsed, results = timed_sleeps(lambda _: client, 4, 0.5)
        assert all(r["slept"] >= 0.49 and not r["cancelled"] for r in results)
        assert elapsed < 1.5, f"four 0.5 s calls took {elapsed:.2f} s: not run concurrently (serial: 2 s)"


def test_threaded_server_never_runs_more_than_max_workers_calls_at_once():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--max-workers", "2") as server:
        client = server.client()
        assert client.stats().max_workers == 2
        elapsed, results = timed_sleeps(lambda _: client, 4, 0.5)
        assert all(not r["cancelled"] for r in results)
        assert elapsed >= 0.95, f"four 0.5 s calls on 2 workers took only {elapsed:.2f} s"


def test_threaded_server_defaults_to_sixteen_workers():
    with WorkerServer("threaded", "--adapter", SHOWCASE) as server:
        stats = server.client().stats()
        assert stats.max_workers == 16 and stats.worker_mode == "threaded"


# --- process server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def process_server():
    with WorkerServer("process", "--adapter", SHOWCASE, "--max-queue", "1") as server:
        yield server


def test_process_server_runs_one_tool_call_at_a_time(process_server):
    client = process_server.client()
    assert client.stats().max_workers == 1
    elapsed, results = timed_sleeps(lambda _: client, 2, 0.5)
    assert all(not r["cancelled"] for r in results)
    assert elapsed >= 0.95, f"two 0.5 s calls on a process server took only {elapsed:.2f} s"


def test_process_server_queues_up_to_max_queue_then_refuses_with_resource_exhausted(process_server):
    client = process_server.client()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.execute, "sleep", {"seconds": 3.0})
        assert wait_until(lambda: client.stats().requests_active == 1)
        queued = pool.submit(client.execute, "sleep", {"seconds": 0.0})
        assert wait_until(lambda: client.stats().requests_queued == 1)
        started = time.monotonic()
        with pytest.raises(BridgeCallError) as caught:
            client.execute("sleep", {"seconds": 0.0})
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max-queue" in caught.value.message or "busy" in caught.value.message
        assert time.monotonic() - started < 1.0  # refused at once, not after waiting
        assert not running.result(timeout=10)["cancelled"]
        assert queued.result(timeout=10) == {"slept": pytest.approx(0.0, abs=0.05), "cancelled": False}
    assert client.stats().requests_queued == 0


def test_queued_call_gives_up_at_its_deadline(process_server):
    client = process_server.client()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.execute, "sleep", {"seconds": 3.0})
        assert wait_until(lambda: client.stats().requests_active == 1)
        with pytest.raises(BridgeCallError) as caught:
            client.execute("sleep", {"seconds": 0.0}, timeout=0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        running.result(timeout=10)
    assert wait_until(lambda: client.stats().requests_queued == 0)


def test_max_queue_zero_refuses_every_call_beyond_the_running_ones():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--max-workers", "1", "--max-queue", "0") as server:
        client = server.client()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.execute, "sleep", {"seconds": 3.0})
            assert wait_until(lambda: client.stats().requests_active == 1)
            with pytest.raises(BridgeCallError) as caught:
                client.execute("add", {"a": 1, "b": 2})
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            running.result(timeout=10)
        assert client.execute("add", {"a": 1, "b": 2}) == 3


# --- control RPCs never wait behind tool calls ---------------------------------------------------------

def calls_in_flight(client, calls) -> str:
    """What a failed wait saw: the server's counters and how each call ended, if it did."""
    stats = client.stats()
    ended = [repr(c.exception()) if c.done() else "running" for c in calls]
    return f"requests_active={stats.requests_active} requests_queued={stats.requests_queued}; calls: {ended}"


@pytest.mark.parametrize("mode, flags", [("threaded", ["--max-workers", "2", "--max-queue", "2"]),
                                         ("process", ["--max-queue", "2"])])
def test_ping_stats_heartbeat_and_health_answer_while_every_slot_and_queue_place_is_busy(mode, flags):
    with WorkerServer(mode, "--adapter", SHOWCASE, *flags) as server:
        client = server.client()
        slots = client.stats().max_workers
        with ThreadPoolExecutor(slots + 2) as pool:
            # The slots are taken first, by calls long enough that the queued ones are sure to find them
            # all still busy however slowly a loaded machine starts the calls.
            calls = [pool.submit(client.execute, "sleep", {"seconds": 4.0}) for _ in range(slots)]
            assert wait_until(lambda: client.stats().requests_active == slots), calls_in_flight(client, calls)
            calls += [pool.submit(client.execute, "sleep", {"seconds": 0.1}) for _ in range(2)]
            assert wait_until(lambda: client.stats().requests_queued == 2), calls_in_flight(client, calls)
            assert client.stats().requests_active == slots + 2
            channel = server.channel()
            health = health_pb2_grpc.HealthStub(channel)
            started = time.monotonic()
            assert client.ping("still there").message == "still there"
            assert client.heartbeat().serving
            assert client.stats().requests_queued == 2
            assert len(client.describe_tools().tools) > 3
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 1.0, "control RPCs waited behind tool calls"
            with pytest.raises(BridgeCallError) as caught:  # the tool queue itself is full
                client.execute("add", {"a": 1, "b": 1})
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert all(not c.result(timeout=15)["cancelled"] for c in calls)


# --- pre-forked process server ----------------------------------------------------------------------------

def parent_pid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def test_preforked_processes_share_the_port_and_each_serve_calls():
    with WorkerServer("process", "--adapter", SPEC_ADAPTER, "--processes", "2") as server:
        by_pid: dict[int, object] = {}
        for _ in range(24):  # each channel is its own TCP connection; the kernel spreads them
            stub = server.stub(OWN_CONNECTION)
            pid = stub.Ping(pb.PingRequest(), timeout=10).pid
            by_pid.setdefault(pid, stub)
            if len(by_pid) == 2:
                break
        assert len(by_pid) == 2, f"24 connections all reached the same process: {list(by_pid)}"
        assert server.pid not in by_pid
        assert all(parent_pid_of(pid) == server.pid for pid in by_pid)
        # each worker process set up its own adapter once
        for pid, stub in by_pid.items():
            response = stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="instance_info"), timeout=10)
            assert f'"pid":{pid}' in response.result_json and '"setup_calls":1' in response.result_json
        # two processes: two calls run at once (one per process), four take two rounds, not four
        stubs = list(by_pid.values())

        def sleep_on(stub):
            return stub.ExecuteTool(pb.ExecuteToolRequest(tool_name="stubborn_sleep", args_json='{"seconds": 0.5}'),
                                    timeout=30)

        with ThreadPoolExecutor(4) as pool:
            started = time.monotonic()
            list(pool.map(sleep_on, stubs + stubs))
            elapsed = time.monotonic() - started
        assert 0.95 <= elapsed < 1.7, f"four 0.5 s calls over two processes took {elapsed:.2f} s (serial: 2 s)"
        assert os.getpid() != server.pid


def test_cancelled_queued_call_gives_its_queue_place_back(process_server):
    client = process_server.client()
    stub = process_server.stub()
    running = stub.ExecuteTool.future(pb.ExecuteToolRequest(tool_name="sleep", args_json='{"seconds": 1.0}'),
                                      timeout=30)
    assert wait_until(lambda: client.stats().requests_active == 1)
    queued = stub.ExecuteTool.future(pb.ExecuteToolRequest(tool_name="sleep", args_json='{"seconds": 0.0}'),
                                     timeout=30)
    assert wait_until(lambda: client.stats().requests_queued == 1)
    queued.cancel()
    assert wait_until(lambda: client.stats().requests_queued == 0, timeout=5)
    # the place is free again: with --max-queue 1, another call may wait while the first still runs
    waiting = stub.ExecuteTool.future(pb.ExecuteToolRequest(tool_name="add", args_json='{"a": 1, "b": 2}'),
                                      timeout=30)
    assert waiting.result(timeout=15).result_json == "3"
    assert not running.result(timeout=15).result_json.endswith('"cancelled":true}')
    assert wait_until(lambda: client.stats().requests_active == 0)


def test_preforked_server_replaces_a_worker_process_that_dies():
    import signal

    with WorkerServer("process", "--adapter", SHOWCASE, "--processes", "2") as server:
        def pids_seen(tries=30):
            seen = set()
            for _ in range(tries):
                try:
                    seen.add(server.stub(OWN_CONNECTION).Ping(pb.PingRequest(), timeout=5).pid)
                except grpc.RpcError:
                    pass
                if len(seen) == 2:
                    break
            return seen

        before = pids_seen()
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(pids_seen(10) - before) == 1, timeout=15)  # a new pid serves
        after = pids_seen()
        assert victim not in after and len(after) == 2
        assert server.process.poll() is None
