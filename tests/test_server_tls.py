"""TLS and mutual TLS on the TCP port (--tls-cert, --tls-key, --tls-client-ca), on both transports:
the Python client and grpcurl call through it, a client that cannot verify the server (or that the
server cannot verify) is refused, the bearer token still applies, and bad flags are start-up errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snakepit_bridge.client import BridgeCallError, BridgeClient
from tests.servers import (SCRIPTS, SPEC_ADAPTER, ForkServer, WorkerServer, make_test_pki, run_grpcurl,
                           run_grpcurl_tls)

TRANSPORTS = ["grpcio", "grpclib"]
needs_grpcurl = pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=TRANSPORTS)
def tls_server(request, pki):
    with WorkerServer("threaded", *pki.server_flags(), "--transport", request.param) as server:
        yield server


@pytest.fixture(scope="module", params=TRANSPORTS)
def mtls_server(request, pki):
    with WorkerServer("threaded", *pki.server_flags(mtls=True), "--transport", request.param) as server:
        yield server


def refused(client: BridgeClient) -> BridgeCallError:
    with pytest.raises(BridgeCallError) as caught:
        client.ping()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    return caught.value


# --- Python client -> Python server ------------------------------------------------------------------

def test_a_client_that_trusts_the_ca_calls_a_tls_server(tls_server, pki):
    client = tls_server.client(tls_ca=pki.ca)
    assert client.execute("add", {"a": 2, "b": 3}) == 5
    assert list(client.stream("progress", {"steps": 2}))


def test_the_start_up_log_says_tls_is_on(tls_server, mtls_server):
    tls_server.stderr_match("TLS on.*clients need no certificate")
    mtls_server.stderr_match("mTLS: client certificates required")


def test_a_client_that_trusts_another_ca_is_refused_with_an_error_that_says_why(tls_server, pki):
    error = refused(tls_server.client(tls_ca=pki.other_ca, timeout=10))
    assert "TLS connection" in error.message and "other-ca.pem" in error.message
    assert "CERTIFICATE_VERIFY_FAILED" in error.message


def test_a_plaintext_client_gets_no_answer_from_a_tls_server(tls_server):
    refused(tls_server.client(timeout=5))


def test_a_certificate_for_another_name_is_refused_unless_that_name_is_asked_for(pki, tmp_path):
    flags = ["--tls-cert", pki.wrong_name, "--tls-key", pki.wrong_name_key]
    with WorkerServer("process", *flags) as server:
        error = refused(server.client(tls_ca=pki.ca, timeout=10))
        assert "TLS connection" in error.message and "Hostname" in error.message
        # the server name override: the certificate is checked against wrong.example instead of 127.0.0.1
        assert server.client(tls_ca=pki.ca, tls_server_name="wrong.example").ping().message is not None


def test_mtls_serves_a_client_with_a_certificate_the_ca_signed(mtls_server, pki):
    client = mtls_server.client(tls_ca=pki.ca, tls_cert=pki.client, tls_key=pki.client_key)
    assert client.execute("add", {"a": 1, "b": 2}) == 3


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    error = refused(mtls_server.client(tls_ca=pki.ca, timeout=10))
    assert "client certificate" in error.message or "Connection reset" in error.message


def test_mtls_refuses_a_client_certificate_another_ca_signed(mtls_server, pki):
    # other-ca's own (self-signed) certificate and key: a valid certificate, but not one `ca` signed
    client = mtls_server.client(tls_ca=pki.ca, tls_cert=pki.other_ca, tls_key=pki.other_ca_key, timeout=10)
    refused(client)


def test_health_answers_over_tls(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=open(pki.ca, "rb").read())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_client_tls_options_that_do_not_fit_are_value_errors(pki):
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        BridgeClient("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client)
    with pytest.raises(ValueError, match="tls_ca /nonexistent/ca.pem: cannot read"):
        BridgeClient("127.0.0.1:1", tls_ca="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="tls=False"):
        BridgeClient("127.0.0.1:1", tls=False, tls_ca=pki.ca)


# --- TLS with the bearer token ----------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tls_and_the_bearer_token_both_apply(pki, transport):
    with WorkerServer("threaded", *pki.server_flags(mtls=True), "--auth-token-env", "TLS_TEST_TOKEN",
                      "--transport", transport, env={"TLS_TEST_TOKEN": "s3cret"}) as server:
        tls = dict(tls_ca=pki.ca, tls_cert=pki.client, tls_key=pki.client_key)
        assert server.client(token="s3cret", **tls).execute("add", {"a": 1, "b": 1}) == 2
        for token in ("wrong", None):
            with pytest.raises(BridgeCallError) as caught:
                server.client(token=token, **tls).ping()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


# --- the other ways to serve: pre-forked processes, a fork server's workers, metrics ---------------------

def test_preforked_processes_all_serve_tls(pki):
    with WorkerServer("process", "--processes", "2", *pki.server_flags(mtls=True)) as server:
        for _ in range(4):  # fresh connections, spread by the kernel over both processes
            client = server.client(tls_ca=pki.ca, tls_cert=pki.client, tls_key=pki.client_key)
            assert client.execute("add", {"a": 1, "b": 2}) == 3
            client.close()
        refused(server.client(tls_ca=pki.ca, timeout=10))


def test_a_fork_servers_workers_serve_tls(pki):
    with ForkServer("process", "--adapter", SPEC_ADAPTER, *pki.server_flags()) as fork_server:
        worker = fork_server.spawn("w1", "--port", "0")
        assert worker.client(tls_ca=pki.ca).ping() is not None
        refused(worker.client(tls_ca=pki.other_ca, timeout=10))


def test_the_metrics_endpoint_stays_plain_http(pki):
    pytest.importorskip("prometheus_client")
    with WorkerServer("threaded", *pki.server_flags(), "--metrics-port", "0") as server:
        port = int(server.stderr_match(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"snakepit" in response.read()


# --- grpcurl ------------------------------------------------------------------------------------------

@needs_grpcurl
def test_grpcurl_with_the_ca_lists_services_and_executes_a_tool(tls_server, pki):
    listed = run_grpcurl_tls(tls_server.address, "list", cacert=pki.ca)
    assert listed.returncode == 0, listed.stderr
    assert "snakepit.bridge.BridgeService" in listed.stdout.split()
    called = run_grpcurl_tls(tls_server.address, "snakepit.bridge.BridgeService/ExecuteTool", cacert=pki.ca,
                             data='{"tool_name": "add", "args_json": "{\\"a\\": 20, \\"b\\": 22}"}')
    assert called.returncode == 0, called.stderr
    response = json.loads(called.stdout)
    assert response.get("result_json", response.get("resultJson")) == "42"  # grpcurl's names vary by reflection


@needs_grpcurl
def test_grpcurl_with_a_client_certificate_calls_an_mtls_server_and_without_one_fails(mtls_server, pki):
    with_cert = run_grpcurl_tls(mtls_server.address, "list", cacert=pki.ca, cert=pki.client, key=pki.client_key)
    assert with_cert.returncode == 0, with_cert.stderr
    without = run_grpcurl_tls(mtls_server.address, "list", cacert=pki.ca, timeout=10)
    assert without.returncode != 0


@needs_grpcurl
def test_plaintext_grpcurl_fails_against_a_tls_server(tls_server):
    result = run_grpcurl(tls_server.address, "list", flags=("-connect-timeout", "3"), timeout=10)
    assert result.returncode != 0
    assert "BridgeService" not in result.stdout


@needs_grpcurl
def test_grpcurl_that_trusts_another_ca_fails(tls_server, pki):
    result = run_grpcurl_tls(tls_server.address, "list", cacert=pki.other_ca, timeout=10)
    assert result.returncode != 0
    assert "certificate" in result.stderr


# --- bad flags are start-up errors naming the flag -------------------------------------------------------

def bad_tls_flags(pki, tmp_path) -> list[tuple[list[str], str]]:
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    garbled_key = tmp_path / "garbled-key.pem"
    garbled_key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    return [
        (["--tls-cert", pki.server], "--tls-cert needs --tls-key"),
        (["--tls-key", pki.server_key], "--tls-key needs --tls-cert"),
        (["--tls-client-ca", pki.ca], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", pki.server_key], "--tls-cert /nonexistent/cert.pem: "
                                                                               "cannot read it"),
        (["--tls-cert", pki.server_key, "--tls-key", pki.server_key], "not a PEM certificate"),
        (["--tls-cert", str(garbled), "--tls-key", pki.server_key], "--tls-cert .*garbled.pem: not a valid PEM"),
        (["--tls-cert", pki.server, "--tls-key", pki.server], "--tls-key .*server.pem: not a PEM private key"),
        (["--tls-cert", pki.server, "--tls-key", str(garbled_key)], "--tls-key .*garbled-key.pem: not a private key"),
        (["--tls-cert", pki.server, "--tls-key", pki.client_key], "--tls-key .*client-key.pem is not the private "
                                                                   "key of the certificate in --tls-cert"),
        ([*pki.server_flags(), "--tls-client-ca", str(garbled)], "--tls-client-ca .*garbled.pem: not a valid PEM"),
        ([*pki.server_flags(), "--uds", str(tmp_path / "w.sock")], "--tls-cert --tls-key with a Unix socket"),
    ]


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_bad_tls_flags_are_start_up_errors_naming_the_flag(pki, tmp_path, mode):
    for flags, message in bad_tls_flags(pki, tmp_path):
        result = subprocess.run([sys.executable, str(SCRIPTS[mode]), "--port", "0", *flags]
                                if "--uds" not in flags else [sys.executable, str(SCRIPTS[mode]), *flags],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (flags, result.stderr)
        assert re.search(message, result.stderr), (flags, result.stderr)
        assert "SNAKEPIT_READY" not in result.stdout
