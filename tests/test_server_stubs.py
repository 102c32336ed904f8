"""The generated Python stubs in snakepit_bridge/generated/ match what grpcio-tools makes of the proto."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT

GENERATED = ROOT / "snakepit_bridge" / "generated"
STUBS = ["snakepit_bridge_pb2.py", "snakepit_bridge_pb2.pyi", "snakepit_bridge_pb2_grpc.py"]


def test_generated_stubs_are_not_stale(tmp_path: Path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in STUBS:
        fresh = (tmp_path / name).read_text()
        committed = (GENERATED / name).read_text()
        assert committed == fresh, (f"snakepit_bridge/generated/{name} is stale: run "
                                    "`python3 scripts/gen_proto.py` and commit the result")


def test_generated_grpc_module_imports_its_messages_relatively():
    text = (GENERATED / "snakepit_bridge_pb2_grpc.py").read_text()
    assert "from . import snakepit_bridge_pb2 as" in text
    assert "\nimport snakepit_bridge_pb2" not in text


def test_stubs_describe_every_rpc_of_the_proto():
    from snakepit_bridge.generated import snakepit_bridge_pb2 as pb

    proto = (ROOT / "proto" / "snakepit_bridge.proto").read_text()
    rpcs = [line.split()[1].split("(")[0] for line in proto.splitlines() if line.strip().startswith("rpc ")]
    service = pb.DESCRIPTOR.services_by_name["BridgeService"]
    assert sorted(m.name for m in service.methods) == sorted(rpcs) and len(rpcs) == 10
