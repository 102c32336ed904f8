"""Shared-memory regions: blobs that a same-host caller and a worker pass as files in a private
directory on a tmpfs instead of inline in gRPC messages (the encoding is in the header of
proto/snakepit_bridge.proto).

    RegionDir    the directory (`--shm-dir` on a worker, `shm_dir=` on a client): checked once, then
                 opens regions by name (mapped copy-on-write: no copy on the way in) and writes new ones
    ResultRegions  the regions one call writes for its results, numbered "<prefix>.<n>" (codec.encode
                 removes those of an encoding that fails half-way)

A region is opened only by its exact name, only when it is a regular file owned by this user with no
permission bits for anyone else, and never through a symbolic link: a caller can have read only what
it can name, and names are unguessable (`new_token()`: 128 random bits).
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import threading
from typing import Any

REGION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{15,159}")
RESULT_PREFIX = re.compile(r"[A-Za-z0-9_-]{16,128}")
DEFAULT_MIN_BYTES = 65536
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# Map every page at once, read-only, before the tool touches them: one call instead of a page fault
# per 4 KiB (Linux 5.14+; MAP_POPULATE would copy every page of a private writable map instead).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux" else None)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class RegionError(ValueError):
    """A region that cannot be used: the message names it and why (INVALID_ARGUMENT to a caller)."""


def new_token() -> str:
    """A region name or result prefix nobody can guess: 128 random bits, 32 hex digits."""
    return secrets.token_hex(16)


def check_directory(path: str) -> str:
    """`path`, absolute, when it is a directory owned by this user that no one else can enter; else
    a ValueError that says what to fix."""
    path = os.path.abspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist (create it with mode 0700, on a tmpfs such as /dev/shm)") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise ValueError(f"{path} belongs to uid {info.st_uid}, not to this process's user ({os.geteuid()})")
    if info.st_mode & 0o077:
        raise ValueError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: other users could read the regions "
                         f"in it; chmod 700 {path}")
    return path


class RegionDir:
    """The directory regions live in; `open_*` map a caller's region, `write` makes a new one."""

    def __init__(self, path: str) -> None:
        self.path = check_directory(path)
        self._fd_path = self.path + os.sep

    def open_array(self, name: Any, offset: Any, dtype, shape: list[int]):
        """A writable numpy array over the region (copy-on-write: its writes stay in this process)."""
        import numpy

        nbytes = dtype.itemsize
        for dimension in shape:
            nbytes *= dimension
        view = self._map(name, offset, nbytes)
        if view is None:
            return numpy.zeros(shape, dtype=dtype)
        return numpy.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)

    def open_bytes(self, name: Any, offset: Any, length: Any) -> bytes:
        if type(length) is not int or length < 0:
            raise RegionError(f"region length must be a non-negative integer, got {length!r:.64}")
        view = self._map(name, offset, length)
        return b"" if view is None else bytes(view)

    def _map(self, name: Any, offset: Any, nbytes: int) -> memoryview | None:
        if type(name) is not str or REGION_NAME.fullmatch(name) is None:
            raise RegionError(f"region name {name!r:.64} is not 16-160 characters of [A-Za-z0-9_.-] "
                              "(not starting with '.')")
        if type(offset) is not int or offset < 0:
            raise RegionError(f"region offset must be a non-negative integer, got {offset!r:.64}")
        try:
            fd = os.open(self._fd_path + name, _OPEN_FLAGS)
        except FileNotFoundError:
            raise RegionError(f"region {name} does not exist in {self.path}") from None
        except OSError as exc:  # ELOOP: a symbolic link
            raise RegionError(f"region {name} cannot be opened: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RegionError(f"region {name} is not a regular file")
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise RegionError(f"region {name} must belong to uid {os.geteuid()} with mode 0600 "
                                  f"(it has uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})")
            end = offset + nbytes
            if end > info.st_size:
                raise RegionError(f"region {name} has {info.st_size} bytes; {nbytes} from offset {offset} "
                                  "run past its end")
            if nbytes == 0:
                return None
            # The map stays valid after the caller deletes the file; it is unmapped with the last view.
            mapped = mmap.mmap(fd, end, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if _MADV_POPULATE_READ is not None:
                try:
                    mapped.madvise(_MADV_POPULATE_READ)
                except OSError:  # an older kernel: pages fault in as they are touched
                    pass
        finally:
            os.close(fd)
        return memoryview(mapped)[offset:end]

    def write(self, name: str, data) -> None:
        """A new region `name` holding `data` (any buffer), mode 0600; an existing name is an error."""
        fd = os.open(self._fd_path + name, _CREATE_FLAGS, 0o600)
        try:
            view = memoryview(data).cast("B")
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        except BaseException:
            os.close(fd)
            self.remove(name)
            raise
        os.close(fd)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self._fd_path + name)
        except FileNotFoundError:
            pass


class ResultRegions:
    """The result regions of one call, "<prefix>.<n>" in `directory`: blobs of `min_bytes` or more go
    there instead of inline. Shared by a batch's items, so numbering takes a lock."""

    __slots__ = ("directory", "prefix", "min_bytes", "_next", "_lock", "placed")

    def __init__(self, directory: RegionDir, prefix: str, min_bytes: int = 0) -> None:
        if RESULT_PREFIX.fullmatch(prefix) is None:
            raise RegionError(f"shm_result_prefix {prefix!r:.64} is not 16-128 characters of [A-Za-z0-9_-]")
        self.directory = directory
        self.prefix = prefix
        self.min_bytes = min_bytes or DEFAULT_MIN_BYTES
        self._next = 0
        self._lock = threading.Lock()
        self.placed: list[str] = []

    def place(self, data) -> str:
        """Write `data` as the call's next region; its name."""
        with self._lock:
            name = f"{self.prefix}.{self._next}"
            self._next += 1
        self.directory.write(name, data)
        with self._lock:
            self.placed.append(name)
        return name

    def remove(self, names: list[str]) -> None:
        """Remove regions nobody will read (an encoding that failed half-way)."""
        for name in names:
            self.directory.remove(name)
        with self._lock:
            self.placed = [name for name in self.placed if name not in names]


class CallerRegions:
    """A caller's side of one call (the Python client's; the Elixir client does the same): writes the
    argument regions, names the result prefix, opens result regions as the decoder's `regions`, and
    removes every region of the call once read, or once the call failed."""

    def __init__(self, directory: RegionDir, min_bytes: int = 0) -> None:
        self.directory = directory
        self.arguments = ResultRegions(directory, new_token(), min_bytes)  # places the argument blobs
        self.result_prefix = new_token()
        self.min_bytes = self.arguments.min_bytes
        self._opened: list[str] = []

    def open_array(self, name: Any, offset: Any, dtype, shape: list[int]):
        self._opened.append(name)
        return self.directory.open_array(name, offset, dtype, shape)

    def open_bytes(self, name: Any, offset: Any, length: Any) -> bytes:
        self._opened.append(name)
        return self.directory.open_bytes(name, offset, length)

    def results_read(self) -> None:
        """The result regions decoded so far are mapped (or copied): their files can go."""
        mine = self.result_prefix + "."
        for name in self._opened:
            if type(name) is str and name.startswith(mine):
                self.directory.remove(name)
        self._opened.clear()

    def finish(self, failed: bool) -> None:
        """The call is over: remove its argument regions, and after a failure any result region the
        worker wrote whose reference never arrived."""
        self.results_read()
        self.arguments.remove(list(self.arguments.placed))
        if failed:
            mine = self.result_prefix + "."
            with os.scandir(self.directory.path) as entries:
                for entry in entries:
                    if entry.name.startswith(mine):
                        self.directory.remove(entry.name)
