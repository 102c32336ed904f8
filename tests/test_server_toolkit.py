"""The concurrency toolkit as the server uses it: durable sessions, rate limits, request RNGs,
frozen contexts."""
import concurrent.futures
import time

import grpc
import pytest

from snakepit_bridge.client import BridgeCallError
from tests.servers import WorkerServer

SHOWCASE = ("--adapter", "snakepit_bridge.adapters.showcase.ShowcaseAdapter")


def test_session_survives_a_server_restart_with_a_session_dir(tmp_path):
    session_dir = str(tmp_path / "sessions")
    with WorkerServer("threaded", *SHOWCASE, "--session-dir", session_dir) as first:
        client = first.client()
        assert client.initialize_session("durable-1", {"owner": "test"}).created
        assert client.execute("session_counter", {}, session_id="durable-1") == 1
        assert client.execute("session_counter", {"increment": 5}, session_id="durable-1") == 6
    # A new worker process (as after recycling) serves the same session from its checkpoint.
    with WorkerServer("process", *SHOWCASE, "--session-dir", session_dir) as second:
        client = second.client()
        assert client.get_session_state("durable-1") == {"owner": "test", "count": 6}
        assert client.execute("session_counter", {}, session_id="durable-1") == 7
        response = client.initialize_session("durable-1", {"owner": "someone else"})
        assert not response.created  # existing state is kept, not overwritten
        assert client.cleanup_session("durable-1")
    with WorkerServer("threaded", *SHOWCASE, "--session-dir", session_dir) as third:
        with pytest.raises(BridgeCallError) as missing:
            third.client().get_session_state("durable-1")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_without_a_session_dir_sessions_die_with_the_process():
    with WorkerServer("threaded", *SHOWCASE) as first:
        first.client().initialize_session("volatile", {"a": 1})
    with WorkerServer("threaded", *SHOWCASE) as second:
        with pytest.raises(BridgeCallError) as missing:
            second.client().execute("session_counter", {}, session_id="volatile")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert "volatile" in missing.value.message


def test_calls_over_the_rate_limit_wait_for_a_token_within_their_deadline():
    with WorkerServer("threaded", *SHOWCASE, "--rate-limit", "10", "--rate-burst", "1") as server:
        client = server.client()
        started = time.monotonic()
        for _ in range(6):
            assert client.execute("add", {"a": 1, "b": 1}, timeout=10) == 2
        # One token up front, then one every 100 ms: six calls need at least ~0.5 s.
        assert time.monotonic() - started >= 0.45


def test_calls_over_the_rate_limit_past_their_deadline_are_resource_exhausted():
    with WorkerServer("threaded", *SHOWCASE, "--rate-limit", "1", "--rate-burst", "1") as server:
        client = server.client()
        assert client.execute("add", {"a": 1, "b": 2}, timeout=5) == 3  # takes the only token
        with pytest.raises(BridgeCallError) as refused:
            client.execute("add", {"a": 1, "b": 2}, timeout=0.3)
        assert refused.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        if refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "rate limit" in refused.value.message
        # Control RPCs are never rate limited, and the server keeps serving.
        assert client.ping().pid == server.pid
        time.sleep(1.1)
        assert client.execute("add", {"a": 2, "b": 2}, timeout=5) == 4


def test_rate_limit_refusal_names_the_limit_when_the_wait_cannot_fit_the_deadline():
    with WorkerServer("threaded", *SHOWCASE, "--rate-limit", "0.2", "--rate-burst", "1") as server:
        client = server.client()
        client.execute("add", {"a": 1, "b": 2}, timeout=5)
        with pytest.raises(BridgeCallError) as refused:
            client.execute("add", {"a": 1, "b": 2}, timeout=1.0)  # next token in ~5 s
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit exceeded: 0.2 calls/s" in refused.value.message


def _random_numbers_under_load(server: WorkerServer, seeds: list[int]) -> dict[int, list[float]]:
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {seed: pool.submit(client.execute, "random_numbers", {"count": 4}, seed=seed) for seed in seeds}
        return {seed: future.result() for seed, future in futures.items()}


def test_a_request_seed_gives_the_same_numbers_whatever_thread_or_server_runs_it():
    seeds = list(range(12))
    with WorkerServer("threaded", *SHOWCASE, "--max-workers", "8") as many_threads:
        parallel = _random_numbers_under_load(many_threads, seeds)
    with WorkerServer("process", *SHOWCASE) as one_thread:
        sequential = _random_numbers_under_load(one_thread, seeds)
    assert parallel == sequential
    assert parallel[0] != parallel[1]  # different seeds, different streams
    assert len({tuple(v) for v in parallel.values()}) == len(seeds)


def test_a_session_seed_gives_a_reproducible_sequence_across_calls():
    def run():
        with WorkerServer("threaded", *SHOWCASE) as server:
            client = server.client()
            client.initialize_session("seeded", seed=7)
            return [client.execute("random_numbers", {"count": 2}, session_id="seeded") for _ in range(3)]

    first, second = run(), run()
    assert first == second
    assert first[0] != first[1]  # each call of the session draws a new stream


def test_unseeded_requests_draw_fresh_numbers():
    with WorkerServer("threaded", *SHOWCASE) as server:
        client = server.client()
        assert client.execute("random_numbers", {"count": 4}) != client.execute("random_numbers", {"count": 4})


def test_the_request_context_is_frozen_inside_a_tool():
    with WorkerServer("threaded", "--adapter", "tests.toolkit_adapters.ContextProbe") as server:
        client = server.client()
        client.initialize_session("ctx-session")
        result = client.execute("mutate_context", {}, session_id="ctx-session", metadata={"k": "original"})
    assert result["session_id"] == "ctx-session"
    assert result["metadata"] == {"k": "original"}
    assert result["outcomes"]["assign"].startswith("FrozenError") and "session_id" in result["outcomes"]["assign"]
    assert result["outcomes"]["delete"].startswith("FrozenError") and "request_id" in result["outcomes"]["delete"]
    assert result["outcomes"]["metadata"].startswith("TypeError")  # a read-only mapping
