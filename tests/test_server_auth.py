"""--auth-token-env NAME: every RPC but health must carry `authorization: Bearer <token>`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snakepit_bridge.client import BridgeCallError
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import ROOT, SCRIPTS, SHOWCASE, WorkerServer

TOKEN = "s3cret-token-for-tests"
ENV = {"SNAKEPIT_TEST_TOKEN": TOKEN}

# every BridgeService method with a request that would succeed when authorised
CALLS = [
    ("Ping", pb.PingRequest(), False),
    ("DescribeTools", pb.DescribeToolsRequest(), False),
    ("ExecuteTool", pb.ExecuteToolRequest(tool_name="add", args_json='{"a": 1, "b": 2}'), False),
    ("ExecuteStreamingTool", pb.ExecuteToolRequest(tool_name="progress", args_json='{"steps": 1}'), True),
    ("ExecuteBatch", pb.ExecuteBatchRequest(tool_name="add", items=[pb.BatchItem(args_json='{"a": 1, "b": 2}')]), False),
    ("InitializeSession", pb.InitializeSessionRequest(session_id="auth-s"), False),
    ("GetSession", pb.GetSessionRequest(session_id="auth-s"), False),
    ("CleanupSession", pb.CleanupSessionRequest(session_id="auth-s"), False),
    ("Heartbeat", pb.HeartbeatRequest(), False),
    ("GetStats", pb.GetStatsRequest(), False),
]


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SHOWCASE, "--auth-token-env", "SNAKEPIT_TEST_TOKEN",
                      env=ENV) as server:
        yield server


def invoke(stub, method, request, streaming, metadata):
    if streaming:
        return list(getattr(stub, method)(request, timeout=10, metadata=metadata))
    return getattr(stub, method)(request, timeout=10, metadata=metadata)


@pytest.mark.parametrize("method, request_message, streaming", CALLS, ids=[c[0] for c in CALLS])
@pytest.mark.parametrize("metadata", [
    (),
    (("authorization", "Bearer wrong-token"),),
    (("authorization", TOKEN),),                      # no "Bearer " scheme
    (("authorization", f"Basic {TOKEN}"),),
    (("authorization", f"Bearer {TOKEN}x"),),
    (("x-token", TOKEN),),
], ids=["none", "wrong", "no-scheme", "basic", "longer", "other-key"])
def test_every_bridge_rpc_without_the_right_bearer_token_is_unauthenticated(server, method, request_message,
                                                                             streaming, metadata):
    with pytest.raises(grpc.RpcError) as caught:
        invoke(server.stub(), method, request_message, streaming, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in caught.value.details() or "token" in caught.value.details()


def test_every_bridge_rpc_with_the_bearer_token_works(server):
    stub = server.stub()
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    for method, request_message, streaming in CALLS:
        invoke(stub, method, request_message, streaming, metadata)  # raises on failure


def test_python_client_with_the_token_calls_tools_and_without_it_is_refused(server):
    assert server.client(token=TOKEN).execute("add", {"a": 2, "b": 3}) == 5
    with pytest.raises(BridgeCallError) as caught:
        server.client().execute("add", {"a": 2, "b": 3})
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_refused_calls_never_reach_the_tool(server):
    authorised = server.client(token=TOKEN)
    before = authorised.stats().requests_total
    for _ in range(3):
        with pytest.raises(BridgeCallError):
            server.client().execute("add", {"a": 1, "b": 1})
    assert authorised.stats().requests_total == before


def test_health_answers_without_a_token(server):
    health = health_pb2_grpc.HealthStub(server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_needs_the_header_for_calls_and_reflection_but_not_for_health(server):
    header = {"authorization": f"Bearer {TOKEN}"}
    ok = server.grpcurl("snakepit.bridge.BridgeService/ExecuteTool", headers=header,
                        data=json.dumps({"tool_name": "add", "args_json": '{"a": 20, "b": 22}'}))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(json.loads(ok.stdout)["result_json"]) == 42
    # reflection with the right token, the call itself with a wrong one
    refused = server.grpcurl("snakepit.bridge.BridgeService/Ping", data="{}",
                             flags=["-reflect-header", f"authorization: Bearer {TOKEN}",
                                    "-rpc-header", "authorization: Bearer wrong"])
    assert refused.returncode == 64 + 16 and "Code: Unauthenticated" in refused.stderr, refused.stderr
    listed = server.grpcurl("list", headers=header)
    assert listed.returncode == 0 and "snakepit.bridge.BridgeService" in listed.stdout
    assert server.grpcurl("list").returncode != 0  # reflection is an RPC like any other
    # the health RPC itself carries no token (only grpcurl's reflection lookup does)
    health = server.grpcurl("grpc.health.v1.Health/Check", data="{}",
                            flags=["-reflect-header", f"authorization: Bearer {TOKEN}"])
    assert health.returncode == 0 and "SERVING" in health.stdout


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_unset_or_empty_token_variable_is_a_clear_start_up_error(mode):
    for env in ({}, {"SNAKEPIT_TEST_TOKEN": ""}):
        result = subprocess.run([sys.executable, str(SCRIPTS[mode]), "--adapter", SHOWCASE, "--port", "0",
                                 "--auth-token-env", "SNAKEPIT_TEST_TOKEN"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL,
                                env={k: v for k, v in os.environ.items() if k != "SNAKEPIT_TEST_TOKEN"} | env)
        assert result.returncode == 1, result.stderr
        assert "SNAKEPIT_TEST_TOKEN" in result.stderr and "SNAKEPIT_READY" not in result.stdout
