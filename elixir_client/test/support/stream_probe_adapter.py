"""StreamProbeAdapter: tools the Elixir stream backpressure tests load (PYTHONPATH=test/support).

`numbered` is a generator that yields as fast as the transport takes its chunks and records how far
it got under a key; `progress_of` reads that record from another thread of the same worker. A test
consuming the stream slowly compares the two to see how far the producer runs ahead of it.
"""
from __future__ import annotations

import threading

from snakepit_bridge import BaseAdapter, tool


class StreamProbeAdapter(BaseAdapter):
    __thread_safe__ = True  # its only state is behind a lock

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._progress: dict[str, dict] = {}

    @tool(description="Yield count chunks {seq, pad}; the record under key counts the chunks handed "
                      "to the server and says whether the generator is running, done or closed")
    def numbered(self, key: str, count: int, size: int = 0):
        if not 0 <= count <= 1_000_000:
            raise ValueError(f"count must be within 0..1000000, got {count}")
        pad = "x" * size
        record = {"produced": 0, "state": "running"}
        with self._lock:
            self._progress[key] = record
        try:
            for seq in range(count):
                with self._lock:
                    record["produced"] = seq + 1
                yield {"seq": seq, "pad": pad}
            with self._lock:
                record["state"] = "done"
            return {"produced": count}
        finally:
            # GeneratorExit: the server closed the generator because the call ended early.
            with self._lock:
                if record["state"] == "running":
                    record["state"] = "closed"

    @tool(description="The record of numbered(key): {produced, state}, or null before it started")
    def progress_of(self, key: str) -> dict | None:
        with self._lock:
            record = self._progress.get(key)
            return dict(record) if record is not None else None

    @tool(description="A blob of size bytes: a large unary response")
    def blob(self, size: int) -> bytes:
        return bytes(range(256)) * (size // 256) + bytes(range(size % 256))
