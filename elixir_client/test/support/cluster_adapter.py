"""The adapter of the Elixir cluster tests (`python_adapter: "cluster_adapter.ClusterAdapter"`):
the showcase tools plus `pid_after`, a call that holds its slot a while and then says which
worker (OS process) ran it, so a test can count the calls each BEAM node's pool served.
"""
from __future__ import annotations

import os

from snakepit_bridge import RequestContext
from snakepit_bridge.adapter import tool
from snakepit_bridge.adapters.showcase import ShowcaseAdapter, sleep_unless_cancelled


class ClusterAdapter(ShowcaseAdapter):
    """The showcase tools plus `pid_after`."""

    @tool(description="Sleep `seconds` (less when cancelled), then answer with this worker's pid")
    def pid_after(self, seconds: float, ctx: RequestContext) -> dict:
        cancelled = sleep_unless_cancelled(seconds, ctx)
        return {"pid": os.getpid(), "cancelled": cancelled}
