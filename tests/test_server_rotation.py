"""SIGUSR1 / SIGUSR2 take a running server out of rotation and back (health NOT_SERVING / SERVING),
without stopping it: watchers see each change, tool calls go on being served, shutdown wins."""
from __future__ import annotations

import queue
import signal
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers import SHOWCASE, SPEC_ADAPTER, WorkerServer

SERVICE = "snakepit.bridge.BridgeService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(server: WorkerServer, service: str = SERVICE) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel())
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def watch(server: WorkerServer) -> "queue.Queue[int]":
    """The statuses of a Health/Watch stream of the BridgeService, as they come."""
    statuses: queue.Queue[int] = queue.Queue()
    stub = health_pb2_grpc.HealthStub(server.channel())
    stream = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)

    def read() -> None:
        try:
            for response in stream:
                statuses.put(response.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return statuses


def test_sigusr1_makes_every_service_not_serving_and_sigusr2_serving_again_for_watchers_too():
    with WorkerServer("threaded", "--adapter", SHOWCASE) as server:
        statuses = watch(server)
        assert statuses.get(timeout=10) == SERVING
        server.process.send_signal(signal.SIGUSR1)
        assert statuses.get(timeout=10) == NOT_SERVING
        assert check(server) == NOT_SERVING and check(server, "") == NOT_SERVING
        server.process.send_signal(signal.SIGUSR2)
        assert statuses.get(timeout=10) == SERVING
        assert check(server) == SERVING and check(server, "") == SERVING


def test_a_server_out_of_rotation_still_serves_tool_calls_and_runs_on():
    with WorkerServer("process", "--adapter", SHOWCASE) as server:
        server.process.send_signal(signal.SIGUSR1)
        client = server.client()
        assert client.execute("echo", {"message": "still here"})["message"] == "still here"
        assert check(server) == NOT_SERVING
        assert server.process.poll() is None


def test_sigusr2_after_shutdown_began_does_not_make_the_server_serving_again():
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--grace", "10") as server:
        statuses = watch(server)
        assert statuses.get(timeout=10) == SERVING
        client = server.client()
        results: list = []
        # a call in flight keeps the server in its shutdown while SIGUSR2 comes
        done = threading.Thread(target=lambda: results.append(client.execute("stubborn_sleep", {"seconds": 1.5})),
                                daemon=True)
        done.start()
        while client.stats().requests_active == 0:
            assert done.is_alive()
        server.process.send_signal(signal.SIGTERM)
        assert statuses.get(timeout=10) == NOT_SERVING
        server.process.send_signal(signal.SIGUSR2)
        assert server.process.wait(timeout=20) == 0
        seen = []
        while not statuses.empty():
            seen.append(statuses.get())
        assert SERVING not in seen
        done.join(timeout=10)
        assert results and results[0]["slept"] >= 1.49  # the call in flight ran to its end meanwhile
