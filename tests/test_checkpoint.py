"""Specification of snakepit_bridge.checkpoint.SafeCheckpoint."""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import stat
import threading
import time

import pytest

from snakepit_bridge.checkpoint import CheckpointError, SafeCheckpoint


# ---------------------------------------------------------------------------
# FLAWED REFERENCE -- SafeCheckpoint as written in concurrency-chapter7.md
# (paths made explicit so it can run here).  Kept only to show its flaws
# side by side with the fix.  Do not use.
# ---------------------------------------------------------------------------
class _FlawedDocCheckpoint:
    def __init__(self, directory, run_id):
        self.dir = str(directory)
        self.checkpoint_path = os.path.join(self.dir, f"{run_id}.json")
        self.lock_path = os.path.join(self.dir, f"{run_id}.lock")

    def save_state(self, node, data):
        import tempfile
        lock_fd = os.open(self.lock_path, os.O_CREAT | os.O_WRONLY, 0o666)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            current = {}
            if os.path.exists(self.checkpoint_path):
                with open(self.checkpoint_path) as f:
                    current = json.load(f)
            current[node] = data
            temp_fd, temp_path = tempfile.mkstemp(dir=self.dir)
            try:
                with os.fdopen(temp_fd, "w") as f:
                    json.dump(current, f)  # FLAW: no fsync of the file ...
                os.replace(temp_path, self.checkpoint_path)  # ... nor of the directory
            except Exception:
                if os.path.exists(temp_path):
                    os.unlink(temp_path)
                raise
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)

    def load_state(self):  # FLAW: no lock, and no read-modify-write primitive at all
        if not os.path.exists(self.checkpoint_path):
            return {}
        with open(self.checkpoint_path) as f:
            return json.load(f)
# --------------------------- end of flawed reference -------------------------


def lock_is_free(path: str) -> bool:
    """True when nobody holds a flock on ``path`` (probed on a fresh descriptor)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def leftover_temp_files(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# --- basic contract --------------------------------------------------------------
def test_round_trip_and_node_preservation(tmp_path):
    cp = SafeCheckpoint(tmp_path / "sub" / "run.json")
    assert cp.load_state() == {}  # no file -> {}
    assert not cp.exists() and not (tmp_path / "sub").exists()  # reading created nothing
    cp.save_state("a", {"x": 1})
    cp.save_state("b", [1, 2, 3])
    assert cp.load_state() == {"a": {"x": 1}, "b": [1, 2, 3]}
    assert cp.lock_path == str(tmp_path / "sub" / "run.json.lock")
    # update: return a new dict, or mutate and return None
    assert cp.update(lambda s: {**s, "c": True}) == {"a": {"x": 1}, "b": [1, 2, 3], "c": True}
    assert cp.update(lambda s: s.pop("a") and None) == {"b": [1, 2, 3], "c": True}
    assert "updated_at" not in cp.load_state()  # no keys injected into the caller's namespace
    cp.replace_state({"only": 1})
    assert cp.load_state() == {"only": 1}
    assert cp.delete() is True
    assert cp.delete() is False
    assert cp.load_state() == {}
    assert leftover_temp_files(tmp_path / "sub") == []


def test_update_must_return_dict_or_none(tmp_path):
    cp = SafeCheckpoint(tmp_path / "s.json")
    cp.save_state("k", 1)
    with pytest.raises(CheckpointError):
        cp.update(lambda s: [1, 2])
    assert cp.load_state() == {"k": 1}


# --- the document's flaws, fixed ----------------------------------------------------
def test_lost_update_is_fixed(tmp_path):
    """Two read-modify-writes racing: the document's load_state + save_state loses
    one; update() runs the whole read-modify-write under the exclusive lock."""
    barrier = threading.Barrier(2, timeout=10)

    def flawed_increment(cp):
        n = cp.load_state().get("count", 0)
        barrier.wait()  # both threads have read the same value
        cp.save_state("count", n + 1)

    flawed = _FlawedDocCheckpoint(tmp_path, "flawed")
    threads = [threading.Thread(target=flawed_increment, args=(flawed,)) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert flawed.load_state()["count"] == 1  # one increment lost

    fixed = SafeCheckpoint(tmp_path / "fixed.json")
    in_fn = threading.Event()
    release = threading.Event()

    def slow_increment(s):
        in_fn.set()
        release.wait(10)
        s["count"] = s.get("count", 0) + 1

    t1 = threading.Thread(target=fixed.update, args=(slow_increment,))
    t1.start()
    in_fn.wait(10)
    t2 = threading.Thread(target=fixed.update, args=(lambda s: {"count": s.get("count", 0) + 1},))
    t2.start()
    time.sleep(0.2)
    assert t2.is_alive()  # the second update waits for the first to finish
    release.set()
    t1.join(10)
    t2.join(10)
    assert fixed.load_state()["count"] == 2


def test_missing_fsync_is_fixed(tmp_path, monkeypatch):
    """The document never fsyncs, so after a power loss the renamed file can be
    empty or the rename itself lost.  Fixed: fsync(temp file) -> replace -> fsync(dir)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)

    _FlawedDocCheckpoint(tmp_path, "flawed").save_state("n", 1)
    assert events == [("replace", "flawed.json")]  # nothing synced

    events.clear()
    SafeCheckpoint(tmp_path / "fixed.json").save_state("n", 1)
    assert events == [("fsync", "file"), ("replace", "fixed.json"), ("fsync", "dir")]


def test_unlocked_read_is_fixed(tmp_path):
    """Reads take a shared lock: they wait while a writer holds the exclusive lock
    (the document's load_state ignores it), and readers do not exclude each other."""
    cp = SafeCheckpoint(tmp_path / "r.json")
    cp.save_state("v", 1)
    fd = os.open(cp.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer (any process) in mid-update
        done = threading.Event()
        th = threading.Thread(target=lambda: (cp.load_state(), done.set()))
        th.start()
        assert not done.wait(0.3)  # the reader is held back
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert done.wait(10)
        th.join(10)

        fcntl.flock(fd, fcntl.LOCK_SH)  # another reader: does not block us
        assert cp.load_state() == {"v": 1}
        writer = threading.Thread(target=cp.save_state, args=("v", 2))
        writer.start()
        time.sleep(0.2)
        assert writer.is_alive()  # but does block writers
        fcntl.flock(fd, fcntl.LOCK_UN)
        writer.join(10)
        assert cp.load_state() == {"v": 2}
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "content",
    [b'{"a": 1, "b": [1, 2', b"", b"   \n", b"\x00\x00\x00\x00", b"[1, 2, 3]", b'"text"', b"\xff\xfe{}"],
    ids=["truncated", "empty", "blank", "zeros", "list", "string", "bad-utf8"],
)
def test_corrupt_or_truncated_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    cp = SafeCheckpoint(path)
    with pytest.raises(CheckpointError) as info:
        cp.load_state()
    assert str(path) in str(info.value) and info.value.path == str(path)
    with pytest.raises(CheckpointError):
        cp.update(lambda s: {"overwritten": True})
    with pytest.raises(CheckpointError):
        cp.save_state("x", 1)
    assert path.read_bytes() == content  # never silently replaced
    assert lock_is_free(cp.lock_path)


# --- lock released and no debris on every path ---------------------------------------
def test_lock_released_and_no_temp_left_on_every_failure_path(tmp_path, monkeypatch):
    cp = SafeCheckpoint(tmp_path / "f.json")
    cp.save_state("keep", 1)

    class Boom(Exception):
        pass

    def raising_fn(s):
        raise Boom

    with pytest.raises(Boom):
        cp.update(raising_fn)
    assert lock_is_free(cp.lock_path)

    with pytest.raises(TypeError):
        cp.save_state("bad", object())  # not JSON-serializable
    assert lock_is_free(cp.lock_path)

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        cp.save_state("x", 2)
    monkeypatch.undo()
    assert lock_is_free(cp.lock_path)

    with pytest.raises(KeyboardInterrupt):  # BaseException too
        cp.update(lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert lock_is_free(cp.lock_path)

    assert leftover_temp_files(tmp_path) == []
    assert cp.load_state() == {"keep": 1}


def test_reentrant_use_is_an_error_not_a_deadlock(tmp_path):
    cp = SafeCheckpoint(tmp_path / "re.json")
    result: list = []

    def nested(s):
        cp.save_state("inner", 1)

    th = threading.Thread(target=lambda: result.append(pytest.raises(CheckpointError, cp.update, nested)))
    th.start()
    th.join(10)
    assert not th.is_alive() and result
    assert lock_is_free(cp.lock_path)


def test_delete_with_lock_removal_keeps_mutual_exclusion(tmp_path):
    """A waiter that locked the unlinked lock file must not run alongside a holder
    of the new one: it notices the inode changed and locks again."""
    cp = SafeCheckpoint(tmp_path / "d.json")
    cp.save_state("count", 0)
    fd = os.open(cp.lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # hold the old lock file
    waiter = threading.Thread(target=cp.update, args=(lambda s: {"count": s.get("count", 0) + 1},))
    waiter.start()  # blocks on the old inode
    time.sleep(0.2)
    os.unlink(cp.lock_path)  # what delete(remove_lock=True) does under the lock

    in_fn, release = threading.Event(), threading.Event()

    def slow(s):
        in_fn.set()
        release.wait(10)
        s["count"] = s.get("count", 0) + 1

    holder = threading.Thread(target=cp.update, args=(slow,))
    holder.start()
    assert in_fn.wait(10)  # holder locked the new lock file
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    time.sleep(0.3)  # the waiter wakes on the old inode; it must not write now
    release.set()
    holder.join(10)
    waiter.join(10)
    assert cp.load_state()["count"] == 2  # neither increment lost
    assert cp.delete(remove_lock=True) is True
    assert not os.path.exists(cp.lock_path)


# --- stress: 4 processes x 4 threads x 100 updates ------------------------------------
PROCS, THREADS, UPDATES = 4, 4, 100


def _hammer(path: str, proc: int) -> None:
    cp = SafeCheckpoint(path)

    def worker(t: int) -> None:
        for i in range(UPDATES):
            def bump(s, t=t, i=i):
                s["count"] = s.get("count", 0) + 1
                s.setdefault("seen", []).append(f"{proc}-{t}-{i}")
            cp.update(bump)
            if i % 10 == 0:
                cp.save_state(f"p{proc}t{t}", i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_and_threads_lose_no_update(tmp_path, method):
    path = str(tmp_path / "stress.json")
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_hammer, args=(path, p)) for p in range(PROCS)]
    reader_errors: list[BaseException] = []
    counts: list[int] = []
    stop = threading.Event()

    def reader():  # concurrent readers never see a torn or corrupt file, and never go back
        cp = SafeCheckpoint(path)
        while not stop.is_set():
            try:
                counts.append(cp.load_state().get("count", 0))
            except BaseException as exc:  # pragma: no cover - failure path
                reader_errors.append(exc)
                return

    rt = threading.Thread(target=reader)
    t0 = time.monotonic()
    for p in procs:
        p.start()
    rt.start()
    for p in procs:
        p.join(240)
    stop.set()
    rt.join(10)
    elapsed = time.monotonic() - t0
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    state = SafeCheckpoint(path).load_state()
    total = PROCS * THREADS * UPDATES
    assert state["count"] == total
    assert sorted(state["seen"]) == sorted(
        f"{p}-{t}-{i}" for p in range(PROCS) for t in range(THREADS) for i in range(UPDATES)
    )
    assert all(state[f"p{p}t{t}"] == 90 for p in range(PROCS) for t in range(THREADS))
    assert reader_errors == []
    assert counts == sorted(counts)
    assert leftover_temp_files(tmp_path) == []
    assert elapsed < 240


def _signal_then_sleep(event, seconds: float) -> None:
    event.set()
    time.sleep(seconds)


def test_fork_while_a_thread_holds_the_lock_does_not_leak_it_to_the_child(tmp_path):
    """A forked child inherits the lock descriptor; unless it is closed in the
    child, the flock stays held after the parent releases it, as long as the
    child lives."""
    cp = SafeCheckpoint(tmp_path / "fork.json")
    in_fn, release = threading.Event(), threading.Event()

    def slow(s):
        in_fn.set()
        release.wait(10)
        s["done"] = True

    th = threading.Thread(target=cp.update, args=(slow,))
    th.start()
    assert in_fn.wait(10)
    ctx = mp.get_context("fork")
    child_running = ctx.Event()
    child = ctx.Process(target=_signal_then_sleep, args=(child_running, 3))
    child.start()
    try:
        assert child_running.wait(30)  # the child's at-fork hooks have run by now
        release.set()
        th.join(10)
        assert lock_is_free(cp.lock_path), "the child kept the parent's checkpoint lock"
        cp.save_state("after", 1)  # and the parent is not blocked by the child
    finally:
        child.join(10)
    assert cp.load_state() == {"done": True, "after": 1}
