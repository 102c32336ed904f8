"""Shared fixtures. The whole session (and the servers it starts) keeps matplotlib's cache and config
in a temporary directory, so the tests write nothing under the user's home."""
import atexit
import os
import shutil
import tempfile

_MPL_DIR = tempfile.mkdtemp(prefix="snakepit-tests-mpl-")
os.environ["MPLCONFIGDIR"] = _MPL_DIR
atexit.register(shutil.rmtree, _MPL_DIR, ignore_errors=True)

import pytest

from tests.servers import WorkerServer


@pytest.fixture(scope="module")
def threaded_server():
    """One threaded showcase server shared by a test module."""
    with WorkerServer("threaded", "--max-workers", "8") as server:
        yield server


@pytest.fixture(scope="module")
def process_server():
    with WorkerServer("process") as server:
        yield server


# --- server-suite fixtures (tests/test_server_*.py) ---------------------------------------------
from tests.servers import SPEC_ADAPTER  # noqa: E402


@pytest.fixture(scope="module")
def spec_threaded():
    """A threaded server running tests.adapters_for_tests.SpecAdapter, shared by a test module."""
    with WorkerServer("threaded", "--adapter", SPEC_ADAPTER, "--max-workers", "8") as server:
        yield server


@pytest.fixture(scope="module")
def spec_process():
    """A process server (one tool call at a time) running SpecAdapter, shared by a test module."""
    with WorkerServer("process", "--adapter", SPEC_ADAPTER) as server:
        yield server
