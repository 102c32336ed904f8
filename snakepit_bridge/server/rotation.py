"""The operator's switch of a running server's health, without shutting it down.

    kill -USR1 <pid>   # out of rotation: health NOT_SERVING for every service
    kill -USR2 <pid>   # back in rotation: SERVING

Clients that watch health (the Elixir `worker_profile: :remote` pool's Health/Watch, a Kubernetes
readiness probe) stop sending new calls to a NOT_SERVING server; calls in flight, and calls that still
come, are served as before. Shutdown wins: once it has begun (SIGTERM, ...), SIGUSR2 does not make the
server SERVING again."""
from __future__ import annotations

import signal
from typing import Callable

OUT_OF_ROTATION = signal.SIGUSR1
BACK_IN_ROTATION = signal.SIGUSR2


def install_rotation_signals(set_serving: Callable[[bool, str], None]) -> None:
    """SIGUSR1 calls `set_serving(False, "SIGUSR1")`, SIGUSR2 `set_serving(True, "SIGUSR2")`."""
    signal.signal(OUT_OF_ROTATION, lambda *_: set_serving(False, "SIGUSR1"))
    signal.signal(BACK_IN_ROTATION, lambda *_: set_serving(True, "SIGUSR2"))
