"""The README's TLS section works as written: its openssl commands make a CA and certificates, the
server starts with its flags, and its grpcurl commands and Python client call it over mTLS."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.servers import ROOT, WorkerServer

README = (ROOT / "README.md").read_text(encoding="utf-8")


def tls_section() -> str:
    text = README[README.index("\n## TLS\n"):]
    return text[:text.index("\n## ", 1)]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", tls_section(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def readme_pki(tmp_path_factory):
    """The README's openssl block, run verbatim with bash in a fresh directory."""
    directory = tmp_path_factory.mktemp("readme-tls")
    make_certificates = blocks("bash")[0]
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", make_certificates], cwd=directory, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return directory


@pytest.fixture(scope="module")
def readme_server(readme_pki):
    """The README's serve command with its flags (paths under the test's directory, --port 0)."""
    command = shlex.split(blocks("bash")[1].strip())
    assert command[:2] == ["python", "grpc_server_threaded.py"]
    flags = [str(readme_pki / arg) if arg.startswith("tls/") else arg for arg in command[2:]]
    with WorkerServer("threaded", *flags) as server:
        yield server


def test_the_openssl_commands_make_a_server_certificate_the_ca_verifies(readme_pki):
    for name in ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"):
        assert (readme_pki / "tls" / name).is_file(), name
    verified = subprocess.run(["openssl", "verify", "-CAfile", "tls/ca.pem", "tls/server.pem", "tls/client.pem"],
                              cwd=readme_pki, capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is installed by the test extras")
def test_the_grpcurl_commands_call_the_mtls_server(readme_pki, readme_server):
    commands = [line.strip() for line in blocks("bash")[2].replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) == 2
    for command in commands:
        run = subprocess.run(command.replace("127.0.0.1:50052", readme_server.address), shell=True, cwd=readme_pki,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
    assert '"5"' in run.stdout  # the ExecuteTool call: 2 + 3


def test_the_python_client_example_calls_the_mtls_server(readme_pki, readme_server):
    example = blocks("python")[0].replace("127.0.0.1:50052", readme_server.address)
    run = subprocess.run([sys.executable, "-c", example], cwd=readme_pki, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "5"
