"""Threaded mode with the GIL off: the server says whether it runs free-threaded, and
--require-free-threading makes a GIL that is on a start-up error.

The tests marked `freethreaded` need a free-threaded interpreter for the server:
SNAKEPIT_TEST_SERVER_PYTHON=$(bash scripts/freethreaded-python.sh | tail -1) (scripts/test-freethreaded.sh
sets it); elsewhere they are skipped. The rest run on any interpreter."""
from __future__ import annotations

import os
import subprocess

import pytest

from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from tests.servers import ROOT, SCRIPTS, WorkerServer

SERVER_PYTHON = os.environ.get("SNAKEPIT_TEST_SERVER_PYTHON", "")


def is_free_threaded(python: str) -> bool:
    if not python:
        return False
    probe = subprocess.run([python, "-c", "import sysconfig; print(bool(sysconfig.get_config_var('Py_GIL_DISABLED')))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


freethreaded = pytest.mark.skipif(not is_free_threaded(SERVER_PYTHON),
                                  reason="needs SNAKEPIT_TEST_SERVER_PYTHON to be a free-threaded build")


def start_and_exit(python: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(SCRIPTS["threaded"]), "--port", "0", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_require_free_threading_refuses_an_interpreter_with_the_gil():
    import sys

    if is_free_threaded(sys.executable):
        pytest.skip("this interpreter is free-threaded")
    run = start_and_exit(sys.executable, "--require-free-threading")
    assert run.returncode == 1
    assert "error: --require-free-threading: the GIL is enabled: this interpreter is not a free-threaded build" \
        in run.stderr
    assert "SNAKEPIT_READY" not in run.stdout


def test_the_grpclib_transport_serves_the_same_service_on_any_interpreter():
    with WorkerServer("threaded", "--transport", "grpclib") as server:
        assert server.client().execute("add", {"a": 2, "b": 3}) == 5
        stats = server.stub().GetStats(pb.GetStatsRequest(), timeout=10)
        assert stats.worker_mode == "threaded"
        server.stderr_match("grpclib transport")


@freethreaded
def test_the_threaded_server_runs_with_the_gil_off_on_a_free_threaded_build():
    with WorkerServer("threaded", "--require-free-threading", "--max-workers", "4", python=SERVER_PYTHON) as server:
        stats = server.stub().GetStats(pb.GetStatsRequest(), timeout=10)
        assert stats.gil_enabled is False
        assert stats.python_version.startswith("3.13")
        log = "\n".join(server.stderr_lines)
        assert "GIL disabled, grpclib transport" in log and "free-threaded build: GIL disabled" in log
        # numpy (the showcase adapter's) keeps it off
        assert server.client().execute("compute_intensive", {"data": [1.0, 2.0, 3.0]})


@freethreaded
def test_a_gil_turned_on_at_start_up_is_named_and_refused_with_require_free_threading():
    run = start_and_exit(SERVER_PYTHON, "--require-free-threading", env={"PYTHON_GIL": "1"})
    assert run.returncode == 1
    assert "the GIL is enabled: it was enabled at start-up (PYTHON_GIL=1 or -X gil=1)" in run.stderr
    with WorkerServer("threaded", python=SERVER_PYTHON, env={"PYTHON_GIL": "1"}) as server:
        assert server.stub().GetStats(pb.GetStatsRequest(), timeout=10).gil_enabled is True
        server.stderr_match("free-threaded build: GIL ENABLED")


def test_the_grpclib_listening_socket_says_it_is_tcp_so_asyncio_sets_nodelay_on_its_connections():
    # Without TCP_NODELAY every grpclib response waited for the client's delayed ACK: 44 ms a call.
    # In a process of its own: grpclib's health stubs and grpcio's cannot share one descriptor pool.
    import sys

    pytest.importorskip("grpclib")
    probe = """
import asyncio, socket
from snakepit_bridge.server.endpoint import Endpoint
from snakepit_bridge.server.transport_grpclib import _listen

listener = _listen(Endpoint.tcp("127.0.0.1", 0), reuse_port=False)
assert listener is not None and listener.proto == socket.IPPROTO_TCP, listener


async def accept_one():
    accepted = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listener)
    _, writer = await asyncio.open_connection(*listener.getsockname())
    nodelay = await asyncio.wait_for(accepted, 5)
    writer.close()
    server.close()
    return nodelay

print(asyncio.run(accept_one()))
"""
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"


LEGACY_EXTENSION = r"""
#include <Python.h>
/* Declares nothing about free threading (no Py_mod_gil slot): importing it turns the GIL on. */
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "legacy_ext", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_legacy_ext(void) { return PyModule_Create(&def); }
"""

LEGACY_ADAPTER = """
import legacy_ext  # noqa: F401  (an extension module that turns the GIL on)
from snakepit_bridge.adapters.threaded_showcase import ThreadedShowcaseAdapter


class LegacyAdapter(ThreadedShowcaseAdapter):
    pass
"""


@freethreaded
def test_an_extension_that_turns_the_gil_on_is_named_in_the_log_and_refused_with_require_free_threading(tmp_path):
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the test extension")
    paths = subprocess.run([SERVER_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['include']); "
                            "print(sysconfig.get_config_var('EXT_SUFFIX'))"], capture_output=True, text=True,
                           check=True).stdout.split()
    (tmp_path / "legacy_ext.c").write_text(LEGACY_EXTENSION)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-I{paths[0]}", str(tmp_path / "legacy_ext.c"), "-o",
                    str(tmp_path / f"legacy_ext{paths[1]}")], check=True)
    (tmp_path / "legacy_adapter.py").write_text(LEGACY_ADAPTER)
    env = {"PYTHONPATH": str(tmp_path)}
    run = start_and_exit(SERVER_PYTHON, "--adapter", "legacy_adapter.LegacyAdapter", "--require-free-threading",
                         env=env)
    assert run.returncode == 1
    assert "error: --require-free-threading: the GIL is enabled:" in run.stderr
    assert "legacy_ext" in run.stderr.splitlines()[-1]  # CPython's warning, quoted: it names the module
    with WorkerServer("threaded", "--adapter", "legacy_adapter.LegacyAdapter", python=SERVER_PYTHON, env=env) as server:
        assert server.stub().GetStats(pb.GetStatsRequest(), timeout=10).gil_enabled is True
        log = "\n".join(server.stderr_lines)
        assert "legacy_ext" in log and "PYTHON_GIL=0" in log and "free-threaded build: GIL ENABLED" in log
