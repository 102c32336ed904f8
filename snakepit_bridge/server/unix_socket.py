"""The path of a `--uds` socket, held by one server at a time.

grpcio (and asyncio's create_unix_server) unlink whatever socket is at the path before binding, so a
second server started on a live path would silently take it over, and the first server's clients
would reach the second from then on. Instead, a server claims the path before it binds:

* `<path>.lock`, locked with a POSIX record lock (fcntl.lockf) that is held for the server's life:
  a second snakepit server on the path fails at once, naming the first one's pid. The lock goes with
  the process, however it ends (kill -9 too), and a POSIX lock is not inherited by a fork, so a child
  that an adapter forks cannot keep it alive after the server is gone.
* With the lock held, a socket already at the path is probed: one that accepts a connection belongs
  to a live server that does not take the lock (an older version, another program) and is an error;
  one that refuses is a dead server's and is removed. Anything else at the path is an error.
* The socket is bound under umask 0177, so it is mode 0600 from its first moment: connecting to a
  Unix socket needs write permission on it, so only this user (and root) can connect, and there is no
  window before a chmod in which anyone else could.
* At a clean exit the socket (when it is still the one this server bound) and the lock file are removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from typing import Iterator

log = logging.getLogger("snakepit_bridge.server")

MAX_PATH_BYTES = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL
PROBE_TIMEOUT_SECONDS = 1.0


class UnixSocketError(Exception):
    """The path cannot be served: in use, not a socket, or in a missing directory."""


def path_problem(path: str) -> str | None:
    """Why `path` (absolute) can never be a socket path here, or None. Checked when the flags are parsed."""
    if any(ch.isspace() or not ch.isprintable() for ch in path):
        # the ready line is space-separated: `SNAKEPIT_READY uds=<path> pid=<pid>`
        return f"{path!r} contains whitespace or control characters"
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        return f"{path} is {size} bytes long; a Unix socket path may have at most {MAX_PATH_BYTES}"
    return None


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Around bind(): the socket file is created mode 0600. The umask is the process's, so a file that
    another thread creates in the same instant is owner-only too (stricter, never looser)."""
    previous = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(previous)


class UnixSocketClaim:
    """This server's hold on a socket path: the lock, and which socket file is its own once bound."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = f"{path}.lock"
        self._lock_fd: int | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket this server bound

    def acquire(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise UnixSocketError(f"--uds {self.path}: the directory {directory} does not exist")
        self._lock_fd = self._lock()
        try:
            self._clear_stale_socket()
        except BaseException:
            self.release()
            raise

    def bound(self) -> None:
        """Remember the socket file now at the path as this server's (the only one `release` removes)."""
        st = os.lstat(self.path)
        self._bound = (st.st_dev, st.st_ino)

    def release(self) -> None:
        """Remove this server's socket file (grpcio may have done so already) and the lock file, then
        let go of the lock. Safe to call more than once."""
        if self._lock_fd is None:
            return
        if self._bound is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._bound:
                    os.unlink(self.path)
        # Unlinked while still locked: a newcomer either fails on this lock or, locking the file after it
        # was unlinked, sees that the path no longer names it (see _lock) and locks a fresh one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _lock(self) -> int:
        while True:  # repeats only when the previous holder removed the lock file between open and lock
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise UnixSocketError(f"--uds {self.path}: cannot open the lock file {self.lock_path}: "
                                      f"{exc.strerror}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    who = f"pid {holder}" if holder else "a process"
                    raise UnixSocketError(f"{self.path} is in use by another server ({who} holds "
                                          f"{self.lock_path})") from None
                raise UnixSocketError(f"--uds {self.path}: cannot lock {self.lock_path}: {exc.strerror}") from None
            try:
                current = os.stat(self.lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UnixSocketError(f"--uds {self.path}: that path exists and is not a socket; "
                                  "remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT_SECONDS)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:  # nothing listens: a dead server's socket
            os.unlink(self.path)
            log.info("removed the stale socket %s (its server is gone)", self.path)
            return
        except TimeoutError:  # a listener whose backlog is full is still a listener
            pass
        except OSError as exc:
            raise UnixSocketError(f"--uds {self.path}: cannot tell whether a server listens there: "
                                  f"{exc.strerror or exc}") from None
        finally:
            probe.close()
        raise UnixSocketError(f"{self.path} is in use by another server (it accepts connections)")


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
