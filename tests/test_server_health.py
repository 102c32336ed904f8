"""The standard gRPC health service and server reflection, seen from a Python client."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.servers import SHOWCASE, WorkerServer

SERVICE = "snakepit.bridge.BridgeService"


@pytest.fixture(scope="module", params=["threaded", "process"])
def server(request):
    with WorkerServer(request.param, "--adapter", SHOWCASE) as server:
        yield server


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_is_serving_for_the_server_and_the_bridge_service(server, service):
    stub = health_pb2_grpc.HealthStub(server.channel())
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_an_unknown_service_is_not_found(server):
    stub = health_pb2_grpc.HealthStub(server.channel())
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_serves_the_bridge_file_descriptor(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    responses = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in responses[1].file_descriptor_response.file_descriptor_proto]
    bridge = next(f for f in files if f.package == "snakepit.bridge")
    assert [s.name for s in bridge.service] == ["BridgeService"]
    assert len(bridge.service[0].method) == 10
