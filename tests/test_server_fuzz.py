"""A bounded fuzz run through a real server: 2,000 mutated requests (seeded, so a failure replays)
must each end in under 2 s with OK or a status that blames the request, the server's memory must not
grow past 50 MB, and it must still serve afterwards. `bench/fuzz.py` runs the long version."""
from __future__ import annotations

import os

import pytest

from tests.fuzz_requests import run
from tests.servers import SPEC_ADAPTER, WorkerServer, proc_status_mb

FUZZ_SEED = int(os.environ.get("SNAKEPIT_FUZZ_SEED", "20261202"))


@pytest.mark.parametrize("mode", ["threaded", "process"])
def test_two_thousand_mutated_requests_get_client_statuses_quickly_and_the_server_serves_on(mode):
    with WorkerServer(mode, "--adapter", SPEC_ADAPTER) as server:
        run(server.address, 50, FUZZ_SEED + 1)  # warm-up: first-use allocations are not growth
        before = proc_status_mb(server.pid, "VmRSS")
        report = run(server.address, 2000, FUZZ_SEED, deadline_s=55)
        growth = proc_status_mb(server.pid, "VmRSS") - before
        assert report.calls == 2000, f"only {report.calls} requests in 55 s"
        assert not report.server_faults, report.server_faults[:10]
        assert not report.slow, report.slow[:10]
        assert growth < 50, f"server RSS grew {growth:.1f} MB"
        assert report.codes["OK"] > 100 and report.codes["INVALID_ARGUMENT"] > 100, report.codes  # both kinds exercised
        assert server.client().execute("noop") is None and server.process.poll() is None
