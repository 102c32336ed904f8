"""deploy/kubernetes/ cannot run here (no cluster); what can be checked without one is checked: the
Deployment's ports, gRPC probes and server flags agree with each other and with the server (its flag
parser accepts the command, its health service answers SERVING for the probes' service), the Service
is headless and selects the pods, and the Elixir pool config discovers that Service on that port.
(PyYAML is not installed here: `load_all` reads the block-style subset the manifests use.)"""
from __future__ import annotations

import re

from grpc_health.v1 import health_pb2, health_pb2_grpc

from snakepit_bridge.server.settings import parse_settings
from tests.servers import ROOT, WorkerServer
from tests.test_server_docker import exec_form

DEPLOY = ROOT / "deploy" / "kubernetes"


def scalar(text: str):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def load_all(text: str) -> list:
    """The documents of a block-style YAML stream: mappings, sequences, plain or quoted scalars."""
    docs = []
    for doc in re.split(r"^---\s*$", text, flags=re.M):
        lines = [(len(line) - len(line.lstrip(" ")), line.strip()) for line in doc.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        if lines:
            value, end = node(lines, 0, lines[0][0])
            assert end == len(lines), f"cannot read line {lines[end]}"
            docs.append(value)
    return docs


def node(lines, i, indent):
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        return sequence(lines, i, indent)
    return mapping(lines, i, indent)


def sequence(lines, i, indent):
    items = []
    while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
        rest = lines[i][1][1:].strip()
        if not rest:
            value, i = node(lines, i + 1, lines[i + 1][0])
        elif re.match(r"^[^\"']*?:(\s|$)", rest):  # "- key: value": a mapping whose first key is here
            value, i = mapping([*lines[:i], (indent + 2, rest), *lines[i + 1:]], i, indent + 2)
        else:
            value, i = scalar(rest), i + 1
        items.append(value)
    return items, i


def mapping(lines, i, indent):
    result = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, _, rest = lines[i][1].partition(":")
        rest = rest.strip()
        if rest:
            result[key], i = scalar(rest), i + 1
        elif i + 1 < len(lines) and lines[i + 1][0] > indent:
            result[key], i = node(lines, i + 1, lines[i + 1][0])
        else:
            result[key], i = None, i + 1
    return result, i


def manifests() -> dict:
    docs = load_all((DEPLOY / "workers.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


def container() -> dict:
    (worker,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return worker


def flag(args: list, name: str) -> str:
    return args[args.index(name) + 1]


def test_the_loader_reads_nested_mappings_sequences_and_quoted_scalars():
    doc = "a:\n  b: 1\n  c:\n    - x\n    - \"2\"\n  d:\n    - name: n\n      port: 3\n---\ne: f\n"
    assert load_all(doc) == [{"a": {"b": 1, "c": ["x", "2"], "d": [{"name": "n", "port": 3}]}}, {"e": "f"}]


def test_the_deployment_serves_grpc_on_one_port_with_native_grpc_probes_of_the_bridge_service():
    worker = container()
    port = int(flag(worker["command"], "--port"))
    assert worker["ports"] == [{"name": "grpc", "containerPort": port}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"] == {"port": port, "service": "snakepit.bridge.BridgeService"}
    assert flag(worker["command"], "--host") == "0.0.0.0"  # reachable from other pods


def test_the_command_is_one_the_server_accepts_and_its_drain_fits_the_termination_grace_period():
    command = container()["command"]
    assert command[:2] == ["python", "grpc_server_threaded.py"] and (ROOT / command[1]).exists()
    args = parse_settings("threaded", command[2:]).args
    assert args.grace < manifests()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert args.max_workers == 16


def test_the_command_is_the_docker_images_cmd_plus_a_longer_drain():
    cmd = exec_form("CMD")
    command = container()["command"]
    assert command[:len(cmd)] == cmd and command[len(cmd):] == ["--grace", "30"]


def test_the_probes_service_is_served_and_serving_by_a_server_started_with_that_command():
    command = container()["command"]
    args = command[2:]
    args[args.index("--host") + 1] = "127.0.0.1"  # tests bind 127.0.0.1 only
    args[args.index("--port") + 1] = "0"
    service = container()["readinessProbe"]["grpc"]["service"]
    with WorkerServer("threaded", *args) as server:
        stub = health_pb2_grpc.HealthStub(server.channel())
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_service_is_headless_and_selects_the_deployments_pods_on_its_grpc_port():
    deployment, service = manifests()["Deployment"], manifests()["Service"]
    assert service["spec"]["clusterIP"] == "None"  # DNS answers one A record per ready pod
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == pod_labels == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == container()["ports"][0]["containerPort"] and port["targetPort"] == "grpc"


def test_the_elixir_pool_config_discovers_that_service_by_dns_on_that_port():
    config = (DEPLOY / "pool_config.exs").read_text()
    service = manifests()["Service"]
    found = re.search(r'discovery: \{:dns, "([^"]+)", (\d+)\}', config)
    assert found and "worker_profile: :remote" in config
    name, port = found.group(1), int(found.group(2))
    assert name == f"{service['metadata']['name']}.default.svc.cluster.local"
    assert port == service["spec"]["ports"][0]["port"]
