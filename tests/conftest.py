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


# --- in-process checker fixtures (tests/test_thread_safety_*.py) ---------------------------------


@pytest.fixture
def fast_switching():
    """Threads switch every 10 µs instead of 5 ms, so that unprotected updates really interleave
    (a module opts in with `pytestmark = pytest.mark.usefixtures("fast_switching")`)."""
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def checker():
    """An enabled, non-strict ThreadSafetyChecker (the active one), closed after the test."""
    from snakepit_bridge.thread_safety_checker import ThreadSafetyChecker

    active = ThreadSafetyChecker(enabled=True, strict_mode=False)
    yield active
    active.close()
