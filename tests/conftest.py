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
