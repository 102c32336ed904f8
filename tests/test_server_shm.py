"""Shared-memory regions (`--shm-dir`, the proto header's "Shared memory" section): same-host callers
pass large bytes and arrays as files in a private tmpfs directory instead of inline, both ways; the
tool maps them without a copy; nothing is left behind, whatever happens to the call; anything but a
region the caller could name and that is safe to map is INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time

import grpc
import numpy as np
import pytest

from snakepit_bridge.client import BridgeCallError, BridgeClient
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb
from snakepit_bridge.server.shm import new_token
from tests.servers import ServerFailedToStart, WorkerServer

ADAPTER = "tests.adapters_for_tests.SharedMemoryAdapter"
TAG = "__snakepit__"


def private_directory() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = tempfile.mkdtemp(prefix="snakepit-test-", dir=base)  # mkdtemp makes it 0700
    return path


@pytest.fixture(scope="module")
def shm_dir():
    path = private_directory()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server(shm_dir):
    with WorkerServer("threaded", "--adapter", ADAPTER, "--shm-dir", shm_dir, "--max-workers", "4") as server:
        yield server


@pytest.fixture
def client(server, shm_dir):
    client = BridgeClient(server.address, shm_dir=shm_dir, shm_min_bytes=1024)
    yield client
    client.close()
    assert os.listdir(shm_dir) == [], "a call left regions behind"


def region(directory: str, data: bytes, *, name: str | None = None, mode: int = 0o600) -> str:
    """A region written by hand, as the Elixir client writes them."""
    name = name or new_token()
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    return name


def execute_raw(server, request: pb.ExecuteToolRequest):
    return server.stub().ExecuteTool(request, timeout=10)


def rejected(server, args: dict, **request_fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        execute_raw(server, pb.ExecuteToolRequest(tool_name="echo", args_json=json.dumps(args), **request_fields))
    return raised.value


# --- both ways through the Python client ----------------------------------------------------------
@pytest.mark.parametrize("array", [
    np.arange(300_000, dtype=np.float64),
    np.arange(24_000, dtype=np.int32).reshape(20, 30, 40),
    np.ones((512, 3), dtype=np.complex128),
    (np.arange(10_000) % 2).astype(bool),
    np.arange(100_000, dtype=">f4"),  # big-endian: sent little-endian, equal values
    np.asfortranarray(np.arange(40_000, dtype=np.uint16).reshape(200, 200)),
], ids=["f8", "i4-3d", "c16", "bool", "f4-big-endian", "fortran-order"])
def test_arrays_round_trip_through_regions_exactly(client, array):
    result = client.execute("echo", {"x": array})["x"]
    assert result.shape == array.shape and result.dtype == array.dtype.newbyteorder("<")
    assert np.array_equal(result, array)
    assert result.flags.writeable


def test_bytes_round_trip_through_regions_and_small_values_stay_inline(client):
    payload = os.urandom(200_000)
    result = client.execute("echo", {"raw": payload, "small": b"abc", "tiny": np.arange(3), "n": 7})
    assert result == {"raw": payload, "small": b"abc", "tiny": result["tiny"], "n": 7}
    assert type(result["raw"]) is bytes and np.array_equal(result["tiny"], np.arange(3))


def test_the_tool_gets_an_array_that_maps_the_region_without_a_copy(client, server):
    shared = client.execute("array_origin", {"x": np.zeros(100_000)})
    assert "mmap" in shared["chain"] and shared["writeable"], shared
    inline = BridgeClient(server.address).execute("array_origin", {"x": np.zeros(100_000)})
    assert "mmap" not in inline["chain"], inline


def test_a_tools_writes_to_its_argument_never_reach_the_callers_region(server, shm_dir):
    data = np.zeros(50_000)
    name = region(shm_dir, data.tobytes())
    try:
        args = {"x": {TAG: "ndarray", "shm": name, "offset": 0, "dtype": "<f8", "shape": [50_000]}}
        response = execute_raw(server, pb.ExecuteToolRequest(tool_name="increment_in_place", args_json=json.dumps(args)))
        assert json.loads(response.result_json) == 50_000.0
        with open(os.path.join(shm_dir, name), "rb") as handle:
            assert np.array_equal(np.frombuffer(handle.read()), data)  # copy-on-write
    finally:
        os.unlink(os.path.join(shm_dir, name))


def test_streams_and_batches_carry_regions_and_leave_nothing_behind(client):
    chunks = list(client.stream("array_chunks", {"count": 3, "n": 10_000}))
    assert [float(chunk[0]) for chunk in chunks] == [0.0, 1.0, 2.0]
    results = client.batch("echo", [{"x": np.full(5_000, float(i))} for i in range(4)])
    assert all(r.ok and np.array_equal(r.value["x"], np.full(5_000, float(i))) for i, r in enumerate(results))


def test_the_worker_writes_results_as_0600_regions_named_by_the_callers_prefix(server, shm_dir):
    prefix = new_token()
    response = execute_raw(server, pb.ExecuteToolRequest(
        tool_name="make_bytes", args_json='{"size": 70000}', shm_result_prefix=prefix))
    reference = json.loads(response.result_json)
    assert reference == {TAG: "bytes", "shm": f"{prefix}.0", "offset": 0, "length": 70000}
    path = os.path.join(shm_dir, f"{prefix}.0")
    try:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 70000 and not response.blobs
    finally:
        os.unlink(path)
    # below the threshold the caller asked for, and without a prefix, results stay inline
    response = execute_raw(server, pb.ExecuteToolRequest(
        tool_name="make_bytes", args_json='{"size": 70000}', shm_result_prefix=new_token(),
        shm_result_min_bytes=100_000))
    assert json.loads(response.result_json) == {TAG: "bytes", "blob": 0} and len(response.blobs[0]) == 70000
    assert os.listdir(shm_dir) == []


def test_an_encoding_that_fails_half_way_removes_the_regions_it_wrote(server, shm_dir):
    prefix = new_token()
    with pytest.raises(grpc.RpcError) as raised:
        execute_raw(server, pb.ExecuteToolRequest(tool_name="big_then_unencodable", args_json='{"n": 100000}',
                                                  shm_result_prefix=prefix))
    assert raised.value.code() is grpc.StatusCode.INTERNAL and "$[1]: cannot encode" in raised.value.details()
    assert os.listdir(shm_dir) == []


def test_a_worker_killed_mid_call_leaves_no_region_behind(shm_dir):
    with WorkerServer("threaded", "--adapter", ADAPTER, "--shm-dir", shm_dir) as server:
        client = BridgeClient(server.address, shm_dir=shm_dir, shm_min_bytes=1024)
        import threading

        outcome: dict = {}

        def call():
            try:
                client.execute("hold_array", {"x": np.zeros(100_000), "seconds": 30}, timeout=20)
            except BridgeCallError as exc:
                outcome["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        while not os.listdir(shm_dir):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # the tool holds it now
        server.kill()
        caller.join(20)
        assert outcome["error"].code is grpc.StatusCode.UNAVAILABLE
    assert os.listdir(shm_dir) == []


def test_a_result_prefix_sent_to_a_worker_without_shm_dir_gets_inline_results():
    with WorkerServer("threaded", "--adapter", ADAPTER) as server:
        response = execute_raw(server, pb.ExecuteToolRequest(tool_name="make_bytes", args_json='{"size": 70000}',
                                                             shm_result_prefix=new_token()))
        assert json.loads(response.result_json) == {TAG: "bytes", "blob": 0}
        assert server.client().ping().shm_dir == ""
        error = rejected(server, {"x": {TAG: "bytes", "shm": new_token(), "offset": 0, "length": 1}})
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "args_json.x" in error.details() and "without --shm-dir" in error.details()


def test_ping_reports_the_shm_dir(server, shm_dir):
    assert server.client().ping().shm_dir == os.path.abspath(shm_dir)


# --- what a caller cannot have read -----------------------------------------------------------------
def test_regions_that_are_not_safe_to_map_are_invalid_arguments_naming_the_field(server, shm_dir):
    good = region(shm_dir, b"x" * 64)
    loose = region(shm_dir, b"x" * 64, mode=0o644)
    link = new_token()
    os.symlink(os.path.join(shm_dir, good), os.path.join(shm_dir, link))
    os.mkdir(os.path.join(shm_dir, "d" + new_token()))
    directory_name = next(name for name in os.listdir(shm_dir) if name.startswith("d"))
    outside = tempfile.NamedTemporaryFile(dir=os.path.dirname(shm_dir))
    os.chmod(outside.name, 0o600)
    cases = {
        "../" + os.path.basename(outside.name): "is not 16-160 characters",
        ".hidden" + new_token(): "is not 16-160 characters",
        "short": "is not 16-160 characters",
        new_token(): "does not exist",
        link: "cannot be opened",
        loose: "mode 0600",
        directory_name: "not a regular file",
    }
    try:
        for name, expected in cases.items():
            error = rejected(server, {"pic": {TAG: "bytes", "shm": name, "offset": 0, "length": 8}})
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, name
            assert "args_json.pic" in error.details() and expected in error.details(), (name, error.details())
        for tree, expected in (
                ({TAG: "bytes", "shm": good, "offset": 60, "length": 8}, "run past its end"),
                ({TAG: "bytes", "shm": good, "offset": -1, "length": 8}, "non-negative integer"),
                ({TAG: "bytes", "shm": good, "offset": 0, "length": "8"}, "non-negative integer"),
                ({TAG: "ndarray", "shm": good, "offset": 0, "dtype": "<f8", "shape": [9]}, "run past its end"),
                ({TAG: "ndarray", "shm": 7, "offset": 0, "dtype": "<f8", "shape": [1]}, "is not 16-160")):
            error = rejected(server, {"pic": tree})
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and expected in error.details(), error.details()
        error = rejected(server, {}, shm_result_prefix="../../etc")
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "shm_result_prefix" in error.details()
        assert server.client().execute("echo", {"a": 1}) == {"a": 1}  # still serving
    finally:
        outside.close()
        shutil.rmtree(shm_dir, ignore_errors=True)
        os.mkdir(shm_dir, 0o700)


@pytest.mark.parametrize("problem", ["missing", "mode 0755", "a file"])
def test_a_shm_dir_others_could_read_or_that_is_not_there_stops_the_worker_at_start(problem):
    base = private_directory()
    path = os.path.join(base, "regions")
    if problem == "mode 0755":
        os.mkdir(path)
        os.chmod(path, 0o755)
    elif problem == "a file":
        open(path, "w").close()
    try:
        server = WorkerServer("threaded", "--shm-dir", path, startup_timeout=20)
        with pytest.raises(ServerFailedToStart):
            server.start()
        server.process.wait(10)
        expected = {"missing": "does not exist", "mode 0755": "chmod 700", "a file": "is not a directory"}[problem]
        assert any("--shm-dir" in line and expected in line for line in server.stderr_lines), server.stderr_lines
    finally:
        shutil.rmtree(base, ignore_errors=True)
