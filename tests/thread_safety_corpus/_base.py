"""Shared pieces of the corpus adapters."""
from __future__ import annotations

import sys
import time

from snakepit_bridge.base_adapter_threaded import ThreadSafeAdapter


def pause() -> None:
    """Widen the window between a read and the write that depends on it."""
    time.sleep(0.0005)


class CorpusAdapter(ThreadSafeAdapter):
    """Declares thread safety (rightly or, in ``racy``, wrongly) and makes the interpreter switch
    threads as often as it can, so that races show up under the GIL too."""

    __thread_safe__ = True
    CALLS: list = []
    EXPECT = None

    def setup(self) -> None:
        sys.setswitchinterval(1e-5)
