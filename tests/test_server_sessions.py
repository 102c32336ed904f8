"""Sessions: per-session state that tools read and write through the context, cleanup, idle expiry."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import SHOWCASE, SPEC_ADAPTER, WorkerServer


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SPEC_ADAPTER) as server:
        yield server


@pytest.fixture(scope="module")
def short_ttl_server():
    with WorkerServer("threaded", "--adapter", SHOWCASE, "--session-ttl", "1") as server:
        yield server


def test_initialize_session_creates_state_that_tools_read(server):
    client = server.client()
    response = client.initialize_session("s-read", {"model": "small", "weights": np.arange(3.0)})
    assert response.session_id == "s-read" and response.created
    assert client.execute("session_get", {"key": "model"}, session_id="s-read") == "small"
    np.testing.assert_array_equal(client.execute("session_get", {"key": "weights"}, session_id="s-read"), np.arange(3.0))
    client.cleanup_session("s-read")


def test_tools_write_session_state_that_later_calls_and_get_session_see(server):
    client = server.client()
    client.initialize_session("s-write")
    client.execute("session_put", {"key": "blob", "value": b"\x00\x01"}, session_id="s-write")
    client.execute("session_put", {"key": "n", "value": 41}, session_id="s-write")
    assert client.execute("session_get", {"key": "n"}, session_id="s-write") == 41
    assert client.get_session_state("s-write") == {"blob": b"\x00\x01", "n": 41}
    client.cleanup_session("s-write")


def test_sessions_are_isolated_from_each_other(server):
    client = server.client()
    client.initialize_session("s-a", {"x": 1})
    client.initialize_session("s-b", {"x": 2})
    client.execute("session_put", {"key": "x", "value": 10}, session_id="s-a")
    assert client.execute("session_get", {"key": "x"}, session_id="s-b") == 2
    assert client.execute("session_get", {"key": "x"}, session_id="s-a") == 10
    client.cleanup_session("s-a")
    client.cleanup_session("s-b")


def test_server_generates_a_session_id_when_none_is_given(server):
    client = server.client()
    first = client.initialize_session()
    second = client.initialize_session()
    assert first.session_id and second.session_id and first.session_id != second.session_id
    assert first.created and second.created
    client.cleanup_session(first.session_id)
    client.cleanup_session(second.session_id)


def test_initializing_an_existing_session_keeps_its_state(server):
    client = server.client()
    client.initialize_session("s-again", {"kept": True})
    again = client.initialize_session("s-again", {"kept": False})
    assert again.created is False
    assert client.get_session_state("s-again") == {"kept": True}
    client.cleanup_session("s-again")


def test_get_session_reports_bookkeeping(server):
    client = server.client()
    client.initialize_session("s-book", {"k": "v"}, ttl_seconds=120)
    for _ in range(3):
        client.execute("session_get", {"key": "k"}, session_id="s-book")
    response = server.stub().GetSession(pb.GetSessionRequest(session_id="s-book"), timeout=30)
    assert response.session_id == "s-book" and response.ttl_seconds == 120
    assert response.created_at_unix_ms <= response.last_used_unix_ms
    assert abs(response.created_at_unix_ms / 1000 - time.time()) < 60
    client.cleanup_session("s-book")


def test_cleanup_session_frees_it(server):
    client = server.client()
    client.initialize_session("s-clean", {"big": b"x" * 1000})
    active = client.stats().sessions_active
    assert client.cleanup_session("s-clean") is True
    assert client.stats().sessions_active == active - 1
    assert client.cleanup_session("s-clean") is False  # already gone
    with pytest.raises(BridgeCallError) as caught:
        client.execute("session_get", {"key": "big"}, session_id="s-clean")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "s-clean" in caught.value.message
    with pytest.raises(BridgeCallError) as caught:
        client.get_session_state("s-clean")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_session_state_must_be_a_json_object(server):
    with pytest.raises(grpc.RpcError) as caught:
        server.stub().InitializeSession(pb.InitializeSessionRequest(session_id="s-bad", state_json="[1, 2]"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "state_json" in caught.value.details()


def test_heartbeat_reports_serving_and_whether_the_session_lives(server):
    client = server.client()
    client.initialize_session("s-beat")
    beat = client.heartbeat("s-beat")
    assert beat.serving and beat.session_alive
    client.cleanup_session("s-beat")
    assert client.heartbeat("s-beat").session_alive is False
    assert client.heartbeat().serving


def test_session_counter_counts_within_a_session(short_ttl_server):
    client = short_ttl_server.client()
    session_id = client.initialize_session().session_id
    assert [client.execute("session_counter", session_id=session_id) for _ in range(3)] == [1, 2, 3]
    assert client.execute("session_counter", {"increment": 10}, session_id=session_id) == 13
    client.cleanup_session(session_id)


def test_idle_session_expires_after_the_session_ttl(short_ttl_server):
    client = short_ttl_server.client()
    session_id = client.initialize_session(state={"x": 1}).session_id
    assert client.initialize_session(session_id).ttl_seconds == 1
    time.sleep(1.6)
    with pytest.raises(BridgeCallError) as caught:
        client.get_session_state(session_id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert client.heartbeat(session_id).session_alive is False


def test_used_session_does_not_expire(short_ttl_server):
    client = short_ttl_server.client()
    session_id = client.initialize_session(state={"x": 1}).session_id
    for _ in range(6):  # 1.8 s in all, never idle for 1 s
        time.sleep(0.3)
        assert client.heartbeat(session_id).session_alive
    assert client.get_session_state(session_id) == {"x": 1}
    client.cleanup_session(session_id)


def test_per_session_ttl_overrides_the_server_default(short_ttl_server):
    client = short_ttl_server.client()
    session_id = client.initialize_session(ttl_seconds=30).session_id
    time.sleep(1.6)
    assert client.get_session_state(session_id) == {}
    client.cleanup_session(session_id)
