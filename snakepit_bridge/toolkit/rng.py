"""Reproducible, thread-safe and process-safe random number streams.

Every stream is derived from a :class:`numpy.random.SeedSequence`, never from
``pid ^ time``:

* ``RNG(seed)`` with an integer seed (``0`` included) is fully reproducible.
* ``RNG()`` / ``RNG(None)`` draws its entropy from the operating system, so two
  processes started in the same second (or two containers that both run as
  PID 1) still get different streams.
* ``derive_rng(root_seed, *keys)`` gives the stream for a *logical* unit of
  work (a request, a batch item, a session's n-th call).  Tie randomness to
  such keys rather than to OS threads and the numbers no longer depend on which
  thread happened to run the work.

Thread safety: the scalar methods (:meth:`RNG.randint`, :meth:`RNG.uniform`,
:meth:`RNG.choice`, :meth:`RNG.normal`, :meth:`RNG.random`) take the RNG's
lock.  :attr:`RNG.numpy` is the raw :class:`numpy.random.Generator`, which is
**not** thread-safe; share it only through :meth:`RNG.numpy_locked`, or give
each thread its own stream (:func:`get_rng` with ``thread_safe=True``,
:func:`thread_stream`, :func:`derive_rng`).

Fork safety: in a forked child every RNG gets a fresh lock (a lock held by
another parent thread at fork time would otherwise never be released), and
every *unseeded* RNG is re-seeded from OS entropy, so a parent and its
children never share an entropy stream.  Seeded RNGs keep their state: with a
seed, give each worker process its own ``worker_index`` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import weakref
from typing import Any, Iterator, MutableSequence, Sequence, TypeVar

import numpy as np

__all__ = [
    "RNG",
    "MAX_SEED",
    "get_rng",
    "set_global_seed",
    "clear_global_seed",
    "global_seed",
    "derive_rng",
    "thread_stream",
    "bind_thread_index",
    "current_thread_index",
]

T = TypeVar("T")

#: Seeds must satisfy ``0 <= seed < MAX_SEED``.  Bounding the seed to 128 bits
#: keeps the SeedSequence entropy at a fixed width, so (seed, keys) pairs can
#: never alias each other.
MAX_SEED = 2**128

_KEY_LIMIT = 2**32  # int keys below this map 1:1 onto a SeedSequence spawn_key word

# Every live RNG, so the at-fork hook can repair them in the child.
_ALL_RNGS: "weakref.WeakSet[RNG]" = weakref.WeakSet()


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must satisfy 0 <= seed < 2**128, got {seed}")
    return seed


def _spawn_key(keys: Sequence[int | str]) -> tuple[int, ...]:
    """Map derivation keys onto a SeedSequence ``spawn_key``.

    Small non-negative ints are used as-is, so ``derive_rng(s, w, k)`` is exactly
    ``SeedSequence(s).spawn(..)[w].spawn(..)[k]`` -- the numpy spawn tree.  Any
    other key tuple (strings, big ints) is hashed with SHA-256 over a typed,
    length-prefixed encoding: stable across processes and Python versions
    (unlike ``hash()``), and distinct tuples cannot collide short of a SHA-256
    collision.
    """
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer, str)):
            raise TypeError(f"derivation keys must be int or str, got {type(key).__name__}")
        if not isinstance(key, str) and key < 0:
            raise ValueError(f"derivation keys must be non-negative, got {key}")
    if all(not isinstance(k, str) and k < _KEY_LIMIT for k in keys):
        return tuple(int(k) for k in keys)
    h = hashlib.sha256(b"snakepit_bridge.rng/v1")
    for key in keys:
        raw = key.encode("utf-8") if isinstance(key, str) else str(int(key)).encode()
        h.update(b"s" if isinstance(key, str) else b"i")
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    digest = h.digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4))


class RNG:
    """A random stream with lock-protected scalar methods and a numpy Generator.

    Args:
        seed: ``0 <= seed < 2**128`` for a reproducible stream (``0`` is a real
            seed); ``None`` for OS entropy.
        seed_sequence: build from this SeedSequence instead (mutually exclusive
            with ``seed``).

    The ``random.Random`` behind the scalar methods and the numpy Generator
    behind :attr:`numpy` are both seeded from the same SeedSequence, so one
    seed reproduces both.
    """

    __slots__ = ("_lock", "_ss", "_random", "_np", "_entropy_seeded", "__weakref__")

    def __init__(
        self,
        seed: int | None = None,
        *,
        seed_sequence: np.random.SeedSequence | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._reseed(seed, seed_sequence)
        _ALL_RNGS.add(self)

    # -- seeding ---------------------------------------------------------------
    def _reseed(self, seed: int | None, seed_sequence: np.random.SeedSequence | None) -> None:
        if seed is not None and seed_sequence is not None:
            raise TypeError("pass either seed or seed_sequence, not both")
        if seed_sequence is not None:
            ss = seed_sequence
        elif seed is not None:  # `is not None`, not truthiness: 0 is a seed
            ss = np.random.SeedSequence(_check_seed(seed))
        else:
            ss = np.random.SeedSequence()  # OS entropy (secrets.randbits(128))
        self._entropy_seeded = seed is None and seed_sequence is None
        self._ss = ss
        # PCG64 consumes the first 8 words of the pool's output; Random gets the
        # next 8, so the two generators never share seed material.
        words = ss.generate_state(16, np.uint32)[8:]
        self._random = random.Random(int.from_bytes(words.tobytes(), "little"))
        self._np = np.random.Generator(np.random.PCG64(ss))

    def seed(self, seed: int | None = None) -> None:
        """Re-seed in place (object identity is kept).

        ``seed=0`` is honoured as seed 0; ``None`` means fresh OS entropy.
        """
        with self._lock:
            self._reseed(seed, None)

    @property
    def seed_sequence(self) -> np.random.SeedSequence:
        """The SeedSequence this stream came from.

        Log ``rng.seed_sequence.entropy`` of an unseeded RNG to replay a run.
        """
        return self._ss

    @property
    def entropy_seeded(self) -> bool:
        """True when the stream came from OS entropy (no seed given)."""
        return self._entropy_seeded

    # -- locked scalar draws ------------------------------------------------------
    def random(self) -> float:
        """A float in [0, 1)."""
        with self._lock:
            return self._random.random()

    def randint(self, a: int, b: int) -> int:
        """An int N with ``a <= N <= b`` (both ends inclusive, like ``random.randint``)."""
        with self._lock:
            return self._random.randint(a, b)

    def uniform(self, a: float, b: float) -> float:
        """A float between ``a`` and ``b``."""
        with self._lock:
            return self._random.uniform(a, b)

    def choice(self, seq: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        with self._lock:
            return self._random.choice(seq)

    def normal(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        """A normally distributed float (``random.normalvariate``)."""
        with self._lock:
            return self._random.normalvariate(mu, sigma)

    def shuffle(self, seq: MutableSequence[Any]) -> None:
        """Shuffle a mutable sequence in place."""
        with self._lock:
            self._random.shuffle(seq)

    def sample(self, population: Sequence[T], k: int) -> list[T]:
        """``k`` distinct elements of ``population``."""
        with self._lock:
            return self._random.sample(population, k)

    # -- numpy -----------------------------------------------------------------------
    @property
    def numpy(self) -> np.random.Generator:
        """The numpy Generator of this stream -- NOT thread-safe.

        numpy Generators must not be used from two threads at once.  Use it
        directly only when this RNG is confined to one thread (a thread stream,
        a per-request RNG); otherwise use :meth:`numpy_locked`.
        """
        return self._np

    @contextlib.contextmanager
    def numpy_locked(self) -> Iterator[np.random.Generator]:
        """Hold this RNG's lock and yield its numpy Generator.

        Example: ``with rng.numpy_locked() as g: x = g.normal(size=100)``.
        Do not call the RNG's own methods inside the block (the lock is not
        re-entrant).
        """
        with self._lock:
            yield self._np

    # -- derivation ------------------------------------------------------------------
    def spawn(self, n: int) -> list["RNG"]:
        """``n`` independent child streams (``SeedSequence.spawn``).

        Deterministic for a seeded parent: the i-th call to ``spawn`` always
        yields the same children.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            children = self._ss.spawn(n)
            entropy = self._entropy_seeded
        out = [RNG(seed_sequence=c) for c in children]
        for child in out:
            child._entropy_seeded = entropy  # children of an entropy stream are re-seeded on fork too
        return out

    # -- fork support ------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._entropy_seeded:
            self._reseed(None, None)

    def __reduce__(self) -> Any:
        # Locks do not pickle; ship the seed sequence and both generator states.
        return (_restore_rng, (self._ss, self._random.getstate(), self._np.bit_generator.state,
                               self._entropy_seeded))

    def __repr__(self) -> str:
        ss = self._ss
        kind = "entropy" if self._entropy_seeded else "seeded"
        return f"<RNG {kind} entropy={ss.entropy} spawn_key={ss.spawn_key}>"


def _restore_rng(ss: np.random.SeedSequence, rstate: Any, npstate: Any, entropy: bool) -> RNG:
    rng = RNG(seed_sequence=ss)
    rng._random.setstate(rstate)
    rng._np.bit_generator.state = npstate
    rng._entropy_seeded = entropy
    return rng


def derive_rng(root_seed: int, *keys: int | str) -> RNG:
    """The deterministic stream for ``(root_seed, *keys)``.

    Same arguments -> same numbers, in any process and on any thread;
    different keys -> independent streams.  Integer keys in ``[0, 2**32)`` follow
    numpy's spawn tree, so ``derive_rng(s, w, k)`` equals ``thread_stream(k)``
    after ``set_global_seed(s, worker_index=w)``.

    Examples: ``derive_rng(seed, "request")``,
    ``derive_rng(session_seed, session_id, request_counter)``.
    """
    ss = np.random.SeedSequence(_check_seed(root_seed), spawn_key=_spawn_key(keys))
    return RNG(seed_sequence=ss)


# =============================================================================
# Process-global state: one shared RNG plus per-thread streams
# =============================================================================
def _os_entropy() -> int:
    """A fresh root entropy from the OS (SeedSequence draws an int when given none)."""
    return int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]


class _GlobalState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seed: int | None = None
        self.worker_index = 0
        # Root entropy for unseeded thread streams; replaced after fork.
        self.entropy = _os_entropy()
        self.generation = 0  # bumped by every (re)seed; stale thread streams are rebuilt
        self.next_index = 0  # next thread index handed out in first-ask order
        self.rng = RNG()

    def root(self) -> int:
        return self.seed if self.seed is not None else int(self.entropy)


_state = _GlobalState()
_local = threading.local()


def get_rng(thread_safe: bool = False) -> RNG:
    """The process-wide shared RNG, or (``thread_safe=True``) this thread's own stream.

    The shared RNG is safe to call from any thread (its methods lock).  A
    thread stream is used by one thread only, so it never contends and its
    :attr:`RNG.numpy` may be used directly.

    Thread ``k``'s stream is ``SeedSequence(root, spawn_key=(worker_index, k))``.
    ``k`` is the index bound with :func:`bind_thread_index`; unbound threads get
    indices in the order in which they first call ``get_rng(thread_safe=True)``
    after the last (re)seed -- with a seed that is only reproducible when
    threads ask in a fixed order, so bind indices (or use :func:`derive_rng`
    per unit of work) when reproducibility matters.
    """
    if not thread_safe:
        return _state.rng
    gen = _state.generation
    cached = getattr(_local, "stream", None)
    if cached is not None and cached[0] == gen:
        return cached[1]
    index = getattr(_local, "bound_index", None)
    with _state.lock:
        gen = _state.generation
        if index is None:
            auto = getattr(_local, "auto_index", None)
            if auto is None or auto[0] != gen:
                auto = (gen, _state.next_index)
                _state.next_index += 1
                _local.auto_index = auto
            index = auto[1]
        rng = _make_thread_stream(index)
    _local.stream = (gen, rng)
    return rng


def _make_thread_stream(index: int) -> RNG:
    # caller holds _state.lock
    ss = np.random.SeedSequence(_state.root(), spawn_key=(_state.worker_index, index))
    rng = RNG(seed_sequence=ss)
    rng._entropy_seeded = _state.seed is None
    return rng


def thread_stream(index: int) -> RNG:
    """A new RNG for thread index ``index`` under the current global seed.

    Same numbers as ``get_rng(thread_safe=True)`` in a thread bound to
    ``index`` (starting from the beginning of the stream).
    """
    if isinstance(index, bool) or not 0 <= index < _KEY_LIMIT:
        raise ValueError(f"thread index must be in [0, 2**32), got {index!r}")
    with _state.lock:
        return _make_thread_stream(index)


def bind_thread_index(index: int | None) -> None:
    """Fix the calling thread's stream index (``None`` unbinds).

    Call it first thing in a worker thread (e.g. from a pool initializer that
    hands out indices deterministically) so that ``get_rng(thread_safe=True)``
    returns the same stream whatever the scheduling.  Rebinding starts the
    stream for the new index from the beginning.
    """
    if index is not None and (isinstance(index, bool) or not 0 <= index < _KEY_LIMIT):
        raise ValueError(f"thread index must be in [0, 2**32), got {index!r}")
    _local.bound_index = index
    _local.stream = None


def current_thread_index() -> int | None:
    """The index of the calling thread's stream, if it has one (bound or assigned)."""
    bound = getattr(_local, "bound_index", None)
    if bound is not None:
        return bound
    auto = getattr(_local, "auto_index", None)
    if auto is not None and auto[0] == _state.generation:
        return auto[1]
    return None


def set_global_seed(seed: int, *, worker_index: int = 0) -> None:
    """Seed the shared RNG and every thread stream of this process deterministically.

    The shared RNG becomes ``SeedSequence(seed, spawn_key=(worker_index,))`` and
    thread ``k``'s stream ``SeedSequence(seed, spawn_key=(worker_index, k))``.
    Give each worker process its own ``worker_index`` so that workers sharing a
    run seed still get independent streams.  Existing thread streams are
    rebuilt on their thread's next :func:`get_rng` call, and first-ask indices
    are handed out afresh.  ``seed=0`` is a real seed.

    numpy's legacy global state (``np.random.seed``) is deliberately left
    alone: tools should draw from an RNG handed to them.
    """
    seed = _check_seed(seed)
    if isinstance(worker_index, bool) or not 0 <= worker_index < _KEY_LIMIT:
        raise ValueError(f"worker_index must be in [0, 2**32), got {worker_index!r}")
    with _state.lock:
        _state.seed = seed
        _state.worker_index = worker_index
        _state.generation += 1
        _state.next_index = 0
        new = RNG(seed_sequence=np.random.SeedSequence(seed, spawn_key=(worker_index,)))
        # Re-seed in place so references held elsewhere follow the new seed.
        with _state.rng._lock:
            _state.rng._ss, _state.rng._random, _state.rng._np = new._ss, new._random, new._np
            _state.rng._entropy_seeded = False


def clear_global_seed() -> None:
    """Return to OS entropy for the shared RNG and all thread streams."""
    with _state.lock:
        _state.seed = None
        _state.worker_index = 0
        _state.entropy = _os_entropy()
        _state.generation += 1
        _state.next_index = 0
    _state.rng.seed(None)


def global_seed() -> int | None:
    """The seed set by :func:`set_global_seed`, or ``None`` (OS entropy)."""
    return _state.seed


def _after_fork_in_child() -> None:
    _state.lock = threading.Lock()
    if _state.seed is None:
        # The child must not replay the parent's entropy-derived thread streams.
        _state.entropy = _os_entropy()
        _state.generation += 1
        _state.next_index = 0
    for rng in list(_ALL_RNGS):
        rng._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
