"""One worker forked by the fork server (`forkserver.py`), from fork() to its exit: it takes its own
stdin/stdout/stderr pipes, lets go of everything else the fork server holds, dies with the fork server,
and then serves exactly as a worker started by the script does (`worker.serve_worker`).

It never returns into the fork server's loop: whatever happens, it ends in os._exit(). As in a
multiprocessing child, atexit handlers do not run: those the fork server inherited (a preloaded
adapter's, say) belong to the fork server; the adapter's teardown() is the place to release things.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NoReturn

from .parent_death import die_with_parent
from .settings import READY_NONCE_ENV

if TYPE_CHECKING:
    from ..contract.adapter import BaseAdapter
    from .forkserver_protocol import Spawn
    from .settings import Settings

# SIGKILL, not SIGTERM: a fork server that was killed leaves nobody to drain for, and a SIGTERM'd
# child would drain for --grace seconds; the pool's guarantee is that no worker outlives it by more
# than a moment. (A fork server that stops in order gives its children SIGTERM first.)
PARENT_DEATH_SIGNAL = signal.SIGKILL
# Signals the fork server handles itself; blocked around fork() so that none runs its handler in the
# child before the child has put the defaults back.
FORK_SERVER_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


@dataclass(frozen=True)
class ChildPipes:
    """The child's ends of its three pipes (the fork server holds the other ends)."""

    stdin: int
    stdout: int
    stderr: int


def run_child(spawn: Spawn, settings: Settings, pipes: ChildPipes, fork_server_pid: int,
              close_inherited: Callable[[], None], preloaded_adapter: BaseAdapter | None) -> NoReturn:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SERVER_SIGNALS)
        die_with_parent(PARENT_DEATH_SIGNAL, fork_server_pid)
        take_pipes(pipes)
        close_inherited()
        os.environ.update(spawn.env)
        nonce = os.environ.pop(READY_NONCE_ENV, None)  # the script's way, honoured too; never the adapter's
        reseed_numpy()
        from . import logs
        from .worker import serve_worker

        logs.configure(settings.args.log_level)
        code = serve_worker(settings, spawn.nonce or nonce, preloaded_adapter)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def take_pipes(pipes: ChildPipes) -> None:
    """fds 0, 1, 2 become the child's pipes (sys.stdin/stdout/stderr write through them from now on).
    The child's stdin is a pipe that the fork server holds open and never writes: it ends when the fork
    server exits, which is what --exit-on-stdin-eof watches for."""
    for target, fd in ((0, pipes.stdin), (1, pipes.stdout), (2, pipes.stderr)):
        os.dup2(fd, target)
        os.close(fd)


def reseed_numpy() -> None:
    """numpy's legacy global generator (np.random.rand, ...) was seeded once, in the fork server: every
    child would draw the same numbers. A worker the script starts seeds it from fresh entropy (--seed
    leaves it alone: rng.set_global_seed), so this one does too; the random module and
    snakepit_bridge.rng reseed themselves after fork."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
