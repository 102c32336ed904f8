"""Crash-safe JSON checkpoints shared by threads and processes.

:class:`SafeCheckpoint` keeps one JSON object (a ``dict``) in a file:

* writes (:meth:`~SafeCheckpoint.save_state`, :meth:`~SafeCheckpoint.update`,
  :meth:`~SafeCheckpoint.delete`) hold an exclusive ``flock`` on a lock file
  beside it, so a read-modify-write is atomic across threads *and* processes;
* reads hold a shared ``flock``;
* new contents go to a temp file in the same directory (so ``os.replace`` never
  crosses a filesystem), are ``fsync``-ed, atomically renamed over the old
  file, and the directory is ``fsync``-ed so the rename itself is durable;
* every lock is released and every temp file removed on every path,
  exceptions included;
* a corrupt or truncated file raises :class:`CheckpointError`; it is never
  silently treated as empty.

``flock`` locks belong to an open file description, and every operation opens
the lock file afresh, so two threads of one process exclude each other just as
two processes do.  ``flock`` is advisory and unreliable on some network
filesystems (NFS before Linux 2.6.12, some FUSE mounts): keep checkpoints on a
local disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import threading
from typing import Any, Callable, Iterator

__all__ = ["CheckpointError", "SafeCheckpoint"]


class CheckpointError(Exception):
    """The checkpoint cannot be used: corrupt, truncated, not a JSON object, or misused.

    ``path`` names the offending file.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None


# Lock files this thread currently holds, to turn self-deadlock into an error.
_held = threading.local()

# Every lock descriptor currently open in this process.  A forked child inherits
# them, and a flock lives as long as *any* descriptor of its open file
# description: without closing them in the child, a fork taken while another
# thread holds a checkpoint lock would keep that lock held until the child exits.
_open_fds: set[int] = set()
_open_fds_lock = threading.Lock()


def _close_inherited_lock_fds() -> None:
    global _open_fds_lock
    _open_fds_lock = threading.Lock()
    for fd in list(_open_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _open_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_lock_fds)


def _close_lock_fd(fd: int) -> None:
    with _open_fds_lock:
        if fd not in _open_fds:  # already closed by the at-fork hook in a child
            return
        _open_fds.discard(fd)
        os.close(fd)  # closing releases the flock


class SafeCheckpoint:
    """A JSON ``dict`` in ``path``, safe to read and update from many threads and processes.

    Args:
        path: the JSON file.  Its directory is created on first write.
        lock_path: the lock file; defaults to ``path + ".lock"``.  The lock file
            is kept after :meth:`delete` unless ``delete(remove_lock=True)``.
        durable: ``fsync`` the file and its directory on every write (default).
            Turn off only for scratch data: without it a power loss can leave an
            empty or stale file.
        json_dumps_kwargs: extra keyword arguments for ``json.dumps`` (e.g.
            ``{"default": str}``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        lock_path: str | os.PathLike | None = None,
        durable: bool = True,
        json_dumps_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.lock_path = (
            os.path.abspath(os.fspath(lock_path)) if lock_path is not None else self.path + ".lock"
        )
        if self.lock_path == self.path:
            raise ValueError("lock_path must differ from path")
        self.durable = durable
        self._dumps_kwargs = dict(json_dumps_kwargs or {})

    def __repr__(self) -> str:
        return f"SafeCheckpoint({self.path!r})"

    # -- locking -----------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        held: set = getattr(_held, "paths", None) or set()
        _held.paths = held
        if self.lock_path in held:
            # flock on a second descriptor would wait for ourselves forever.
            raise CheckpointError(
                "re-entrant use of the checkpoint (e.g. save_state inside update's fn) "
                "would deadlock; change the dict passed to fn instead",
                self.path,
            )
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        while True:
            with _open_fds_lock:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                _open_fds.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                # delete(remove_lock=True) may have unlinked the lock file while we
                # waited; a lock on an unlinked inode excludes nobody, so retry.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
            except BaseException:
                _close_lock_fd(fd)
                raise
            _close_lock_fd(fd)
        held.add(self.lock_path)
        try:
            yield
        finally:
            held.discard(self.lock_path)
            _close_lock_fd(fd)  # releases the lock on every path

    # -- reading -----------------------------------------------------------------
    def _read_unlocked(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if not raw.strip():
            raise CheckpointError(
                f"checkpoint {self.path} is empty (truncated write or foreign file)", self.path
            )
        try:
            state = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.path} is corrupt or truncated: {exc}", self.path
            ) from exc
        if not isinstance(state, dict):
            raise CheckpointError(
                f"checkpoint {self.path} holds a JSON {type(state).__name__}, not an object",
                self.path,
            )
        return state

    def load_state(self) -> dict[str, Any]:
        """The stored dict; ``{}`` only when the file does not exist.

        Raises:
            CheckpointError: the file exists but is empty, corrupt, truncated or
                not a JSON object.
        """
        if not os.path.isdir(os.path.dirname(self.lock_path)) and not os.path.exists(self.path):
            return {}  # nothing stored yet: do not create directories just to read
        with self._locked(exclusive=False):
            state = self._read_unlocked()
        return {} if state is None else state

    def exists(self) -> bool:
        """Whether the checkpoint file exists."""
        return os.path.exists(self.path)

    # -- writing -----------------------------------------------------------------
    def _write_unlocked(self, state: dict[str, Any]) -> None:
        # Serialize before touching the disk: bad data must not leave debris.
        payload = json.dumps(state, **self._dumps_kwargs).encode("utf-8")
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self.durable:
            _fsync_dir(directory)

    def update(self, fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Atomically read, modify and write the state; returns the new state.

        ``fn`` receives a private copy of the current state (``{}`` if there is no
        file) and either returns the new dict or mutates its argument and returns
        ``None``.  The whole read-modify-write runs under the exclusive lock, so
        concurrent updates from any thread or process are never lost.  If ``fn``
        raises, nothing is written and the exception propagates.

        Raises:
            CheckpointError: the existing file is corrupt (nothing is written), or
                ``fn`` returned something other than a dict or ``None``.
        """
        with self._locked(exclusive=True):
            current = self._read_unlocked() or {}
            result = fn(current)
            new = current if result is None else result
            if not isinstance(new, dict):
                raise CheckpointError(
                    f"update fn must return a dict or None, got {type(new).__name__}", self.path
                )
            self._write_unlocked(new)
        return new  # freshly parsed for this call: nobody else holds it

    def save_state(self, node: str, data: Any) -> None:
        """Set ``state[node] = data`` atomically (other nodes are preserved)."""

        def put(state: dict[str, Any]) -> None:
            state[node] = data

        self.update(put)

    def replace_state(self, state: dict[str, Any]) -> None:
        """Overwrite the whole state with ``state``."""
        if not isinstance(state, dict):
            raise TypeError("state must be a dict")
        self.update(lambda _old: dict(state))

    def delete(self, *, remove_lock: bool = False) -> bool:
        """Remove the checkpoint file; True if it existed.

        With ``remove_lock=True`` the lock file goes too (safe: lockers verify
        that the file they locked is still the one at ``lock_path``).
        """
        with self._locked(exclusive=True):
            try:
                os.unlink(self.path)
                existed = True
            except FileNotFoundError:
                existed = False
            if remove_lock:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)
            if self.durable and (existed or remove_lock):
                _fsync_dir(os.path.dirname(self.path))
        return existed


def _fsync_dir(directory: str) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
