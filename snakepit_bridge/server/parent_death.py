"""A forked worker dies with the process that forked it (Linux PR_SET_PDEATHSIG), so that no worker
outlives its parent, even one killed with SIGKILL.

The kernel only sends the signal for a parent that dies after prctl(); one that died between fork()
and prctl() has already handed the child to init (or a subreaper), which os.getppid() shows: the
child then exits at once instead of serving an owner that is gone.
"""
from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, expected_parent: int) -> None:
    """Ask for `sig` when the parent dies; exit now (code 1) if `expected_parent` is already gone.
    Call it in the child right after fork(), from the thread that will serve (the signal follows the
    death of the parent's forking thread, which is the parent's main thread here)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):  # not Linux: no parent-death signal; stdin EOF is the fallback
        pass
    if os.getppid() != expected_parent:
        os._exit(1)

