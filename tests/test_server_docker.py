"""docker/Dockerfile cannot be built here (no engine); what can be checked without one is checked:
the install mirrors the README, its CMD starts a serving threaded server, and its HEALTHCHECK command
reports a serving server healthy and a missing one unhealthy."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess

from tests.servers import ROOT, WorkerServer

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def exec_form(instruction: str) -> list[str]:
    """The JSON array of a `CMD [...]` / `HEALTHCHECK ... CMD [...]` instruction (continuations joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(instruction):
            return json.loads(line[line.index("["):])
    raise AssertionError(f"no {instruction} in docker/Dockerfile")


def test_dockerfile_installs_like_the_readme():
    assert re.search(r"^FROM python:3\.11-slim$", DOCKERFILE, re.M)
    assert re.search(r"^RUN pip install \.", DOCKERFILE, re.M)
    cmd = exec_form("CMD")
    assert cmd[:2] == ["python", "grpc_server_threaded.py"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    for path in ("pyproject.toml", "README.md", "snakepit_bridge", "grpc_server_threaded.py"):
        assert path in DOCKERFILE and (ROOT / path).exists()


def test_dockerfile_cmd_starts_a_serving_threaded_server():
    cmd = exec_form("CMD")
    args = cmd[2:]
    args[args.index("--host") + 1] = "127.0.0.1"  # tests bind 127.0.0.1 only
    args[args.index("--port") + 1] = "0"
    with WorkerServer("threaded", *args) as server:
        assert server.client().ping().worker_mode == "threaded"


def run_healthcheck(address: str) -> subprocess.CompletedProcess:
    return subprocess.run(exec_form("HEALTHCHECK"), cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SNAKEPIT_HEALTH_ADDRESS": address})


def test_healthcheck_command_passes_against_a_serving_server_and_fails_without_one():
    with WorkerServer("threaded", "--adapter", "snakepit_bridge.adapters.showcase.ShowcaseAdapter") as server:
        healthy = run_healthcheck(server.address)
        assert healthy.returncode == 0, healthy.stderr
        assert exec_form("HEALTHCHECK")[0] == "python"
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(f"127.0.0.1:{port}").returncode != 0


def test_dockerignore_keeps_the_package_in_the_build_context():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for needed in ("snakepit_bridge", "pyproject.toml", "README.md", "grpc_server_threaded.py", "proto"):
        assert needed not in ignored
