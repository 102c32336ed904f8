"""Run a function over many items in parallel with per-item error isolation.

:func:`run_batch` calls ``fn(item)`` for every item and returns one
:class:`BatchOutcome` per item, in input order.  An ``Exception`` raised for
one item becomes that item's error outcome and never disturbs the others.
``BaseException``\\ s that are not ``Exception``\\ s (``KeyboardInterrupt``,
``SystemExit``) are not swallowed: they propagate to the caller, after
not-yet-started items are cancelled.

Each item runs in its own copy of the caller's :mod:`contextvars` context, so
it sees the caller's context variables (request ids, deadlines), and what it
sets is seen neither by other items nor by the caller.  This holds when
run_batch runs items sequentially, on its own threads, or on a supplied
``ThreadPoolExecutor``; other executors (process pools) run ``fn`` as they see
fit.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

__all__ = ["BatchError", "BatchOutcome", "run_batch"]

T = TypeVar("T")


@dataclass(frozen=True)
class BatchError:
    """Why one item failed.

    Attributes:
        type: the exception's class name, e.g. ``"ValueError"``.
        message: ``str(exception)``.
        traceback: the formatted traceback (for a process pool this includes the
            remote traceback).
        exception: the exception object itself (not compared, not in repr).
    """

    type: str
    message: str
    traceback: str
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_exception(cls, exc: BaseException) -> "BatchError":
        """Describe ``exc``."""
        return cls(
            type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            exception=exc,
        )


@dataclass(frozen=True)
class BatchOutcome:
    """The result of one item: ``ok`` with ``value``, or not ``ok`` with ``error``."""

    ok: bool
    value: Any = None
    error: BatchError | None = None

    def unwrap(self) -> Any:
        """The value, or re-raise the original exception (``RuntimeError`` if it is unavailable)."""
        if self.ok:
            return self.value
        assert self.error is not None
        if self.error.exception is not None:
            raise self.error.exception
        raise RuntimeError(f"{self.error.type}: {self.error.message}")


def _outcome_of(fut: cf.Future) -> BatchOutcome:
    try:
        return BatchOutcome(ok=True, value=fut.result())
    except Exception as exc:  # BaseException-only errors propagate on purpose
        return BatchOutcome(ok=False, error=BatchError.from_exception(exc))


def _run_isolated(fn: Callable[[T], Any], item: T) -> BatchOutcome:
    try:
        return BatchOutcome(ok=True, value=contextvars.copy_context().run(fn, item))
    except Exception as exc:
        return BatchOutcome(ok=False, error=BatchError.from_exception(exc))


def run_batch(
    fn: Callable[[T], Any],
    items: Iterable[T],
    max_workers: int,
    *,
    executor: cf.Executor | None = None,
) -> list[BatchOutcome]:
    """Apply ``fn`` to every item, in parallel, isolating failures.

    Args:
        fn: called once per item as ``fn(item)``.
        items: the inputs; results come back in the same order.
        max_workers: most items running at once (>= 1).  With ``max_workers == 1``
            or at most one item, everything runs sequentially in the calling
            thread (no pool is created, ``executor`` is not used).
        executor: submit to this executor (e.g. the server's pool, or a
            ``ProcessPoolExecutor`` with a picklable ``fn``) instead of creating a
            thread pool; at most ``max_workers`` items are in flight on it.  It is
            not shut down.

    Returns:
        One :class:`BatchOutcome` per item, in input order.

    Raises:
        ValueError: ``max_workers < 1``.
        BaseException: a non-``Exception`` raised by ``fn`` (e.g.
            ``KeyboardInterrupt``) is re-raised after pending items are cancelled.
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
    items = list(items)
    if max_workers == 1 or len(items) <= 1:
        return [_run_isolated(fn, item) for item in items]
    if executor is None:
        with cf.ThreadPoolExecutor(
            max_workers=min(max_workers, len(items)), thread_name_prefix="snakepit-batch"
        ) as pool:
            # One context copy per item: a Context cannot be entered by two threads.
            return _drive(pool, lambda item: (contextvars.copy_context().run, fn, item), items, max_workers)
    if isinstance(executor, cf.ThreadPoolExecutor):
        return _drive(executor, lambda item: (contextvars.copy_context().run, fn, item), items, max_workers)
    return _drive(executor, lambda item: (fn, item), items, max_workers)


def _drive(
    executor: cf.Executor,
    make_call: Callable[[Any], tuple],
    items: list,
    max_workers: int,
) -> list[BatchOutcome]:
    """Keep at most ``max_workers`` futures in flight; collect outcomes by index."""
    outcomes: list[BatchOutcome | None] = [None] * len(items)
    in_flight: dict[cf.Future, int] = {}
    next_index = 0
    try:
        while next_index < len(items) or in_flight:
            while next_index < len(items) and len(in_flight) < max_workers:
                call = make_call(items[next_index])
                in_flight[executor.submit(*call)] = next_index
                next_index += 1
            done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                outcomes[in_flight.pop(fut)] = _outcome_of(fut)  # BaseException escapes here
    except BaseException:
        for fut in in_flight:
            fut.cancel()
        raise
    return outcomes  # type: ignore[return-value]
