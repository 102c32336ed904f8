"""Reporting: the findings (their JSON shape and wording), logging each once, raising in strict
mode, and the report that ``GetStats`` and ``--thread-safety-report`` publish.

The report's and the findings' keys are an operator interface: keep them as they are.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

from ..declaration import UNDECLARED_ADAPTER_ADVICE, undeclared_adapter_message
from ..interpreter import free_threaded_build, gil_enabled
from .libraries import UNSAFE_LIBRARIES
from .lockset import Access, Conflict

LockNames = dict[int, str]   # lock id -> how the report names it ("self._lock", ...)


class ThreadSafetyViolation(RuntimeError):
    """Raised in strict mode, in the thread whose call completed a finding."""

    def __init__(self, finding: dict) -> None:
        super().__init__(finding.get("message", "thread safety violation"))
        self.finding = finding


def short_path(path: str) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def element_name(attr: str, part: tuple) -> str:
    """How a part of an attribute reads in code: ``self.cache``, ``self.cache['a']``,
    ``self.table['rows'][3]``."""
    if part[0] == "binding":
        return f"self.{attr}"
    keys = part[1] + ((part[2],) if part[0] == "item" else ())
    return f"self.{attr}" + "".join(f"[{k!r}]" if not isinstance(k, tuple) else
                                    f"[{', '.join(map(repr, k))}]" for k in keys)


def _what(part: tuple) -> str:
    return {"binding": "attribute", "contents": "contents", "values": "contents",
            "item": "element"}.get(part[0], part[0])


_CHECKER_DIR = os.path.dirname(os.path.abspath(__file__))


def stack_as_list(a: Access) -> list[str]:
    """The access's stack, innermost first: ``file:line in function`` (the checker's own frames
    left out)."""
    return [f"{short_path(code.co_filename)}:{line} in {getattr(code, 'co_qualname', code.co_name)}"
            for code, line in a.stack if not code.co_filename.startswith(_CHECKER_DIR)]


def access_as_dict(a: Access, lock_names: LockNames, attr: str = "") -> dict:
    return {
        "thread": a.thread,
        "access": "write" if a.write else "read",
        "what": _what(a.part),
        "element": element_name(attr, a.part) if attr and a.part[0] != "library" else None,
        "method": a.method,
        "function": a.function,
        "tool": a.tool,
        "location": f"{a.file}:{a.line}",
        "file": a.file,
        "line": a.line,
        "locks_held": sorted(lock_names.get(i, f"lock@{i:#x}") for i in a.locks),
        "epoch": a.epoch,
        "stack": stack_as_list(a),
    }


def _severity(strict: bool) -> str:
    return "error" if strict else "warning"


def race_finding(adapter_cls: type, cls_name: str, attr: str, conflict: Conflict,
                 lock_names: LockNames, method_peak: Callable[[str], int], *, strict: bool) -> dict:
    """``unprotected_shared_state``: ``attr`` of an instance of ``adapter_cls`` accessed by two
    threads with no lock in common. ``method_peak(name)``: the most threads inside that method at
    once."""
    first, second, related = conflict
    methods = sorted({a.tool or a.method for a in related} | {first.tool or first.method,
                                                              second.tool or second.method})
    threads = sorted({a.thread for a in related} | {first.thread, second.thread})

    def describe(a: Access) -> str:
        what = "written" if a.write else "read"
        if a.part[0] in ("contents", "values"):
            what = "changed in place" if a.write else "read (contents)"
        elif a.part[0] == "item":
            what = f"{element_name(attr, a.part)} {'written' if a.write else 'read'}"
        held = ", ".join(sorted(lock_names.get(i, f"self.<lock@{i:#x}>") for i in a.locks)) or \
            "no lock"
        return (f"{what} by thread '{a.thread}' in {a.tool or a.method} "
                f"({short_path(a.file)}:{a.line}, holding {held})")

    concurrent = [m for m in methods if method_peak(m) >= 2]
    overlap = ""
    if concurrent:
        peak = max(method_peak(m) for m in concurrent)
        overlap = (f" Method '{concurrent[0]}' accessed by {peak} different threads "
                   f"concurrently.")
    message = (f"THREAD SAFETY: Unprotected shared state: attribute '{attr}' of "
               f"{cls_name} is {describe(first)} and {describe(second)}, with no lock "
               f"in common and no happens-before edge between them (no lock hand-off, queue, "
               f"event, thread start/join or future orders the two).{overlap} Ensure proper "
               f"locking for shared mutable state: wrap "
               f"every access in `with self.acquire_lock():`, or keep it per thread with "
               f"get_thread_local()/set_thread_local().")
    return {
        "kind": "unprotected_shared_state",
        "severity": _severity(strict),
        "adapter": f"{adapter_cls.__module__}.{adapter_cls.__qualname__}",
        "attribute": attr,
        "methods": methods,
        "threads": threads,
        "element": element_name(attr, second.part),
        "ordered": False,
        "why": {
            "locks_in_common": [],
            "happens_before": (f"thread '{first.thread}' at epoch {first.epoch} is not "
                               f"ordered before thread '{second.thread}''s access: no "
                               f"synchronisation between them"),
            "stacks": [stack_as_list(first), stack_as_list(second)],
        },
        "conflict": [access_as_dict(first, lock_names, attr), access_as_dict(second, lock_names, attr)],
        "accesses": [access_as_dict(a, lock_names, attr) for a in related],
        "message": message,
        "advice": "Protect every access with `with self.acquire_lock():` (the same lock for "
                  "all readers and writers), or make the state thread-local.",
    }


def library_finding(lib: str, what: str, conflict: Conflict, lock_names: LockNames, *,
                    strict: bool, **extra: Any) -> dict:
    """``unsafe_library``: ``what`` (an object or module state of ``lib``) used by two threads with
    no lock in common. ``extra``: keys added for an object held in an attribute."""
    first, second, related = conflict
    tools = sorted({a.tool or a.method for a in related} |
                   {first.tool or first.method, second.tool or second.method})
    threads = sorted({a.thread for a in related} | {first.thread, second.thread})
    advice = UNSAFE_LIBRARIES[lib]
    message = (f"THREAD SAFETY: Unsafe library '{lib}' detected: {what} is used by threads "
               f"'{first.thread}' ({short_path(first.file)}:{first.line}) and '{second.thread}' "
               f"({short_path(second.file)}:{second.line}) in tool "
               f"{', '.join(repr(t) for t in tools)} with no lock in common. Use process "
               f"mode or add explicit locking. {advice}")
    finding = {
        "kind": "unsafe_library",
        "severity": _severity(strict),
        "library": lib,
        "object": what,
        "tools": tools,
        "tool": tools[0] if tools else None,
        "threads": threads,
        "accesses": [access_as_dict(a, lock_names) for a in related],
        "message": message,
        "advice": f"Use process mode or add explicit locking. {advice}",
    }
    finding.update(extra)
    return finding


def undeclared_finding(adapter_cls: type) -> dict:
    """``undeclared_thread_safety``: ``adapter_cls`` lacks ``__thread_safe__ = True``. A warning
    even in strict mode (it is about the class, not about a call)."""
    return {
        "kind": "undeclared_thread_safety",
        "severity": "warning",
        "adapter": f"{adapter_cls.__module__}.{adapter_cls.__qualname__}",
        "message": undeclared_adapter_message(adapter_cls),
        "advice": UNDECLARED_ADAPTER_ADVICE,
    }


class Findings:
    """The findings so far. Each is logged once, when added, with the ``⚠️`` prefix."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._items: list[dict] = []

    def add(self, finding: dict, *, log: logging.Logger, raise_violation: bool) -> None:
        """Record and log ``finding``; then, when ``raise_violation`` (strict mode), raise
        :class:`ThreadSafetyViolation` in the calling thread."""
        finding.setdefault("found_at_unix", time.time())
        with self._lock:
            self._items.append(finding)
        msg = finding["message"]
        log.warning("%s%s", "" if msg.startswith("⚠️") else "⚠️  ", msg)
        if raise_violation:
            raise ThreadSafetyViolation(finding)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self._items)


def build_report(*, enabled: bool, strict_mode: bool, started: float, findings: list[dict],
                 methods: dict[str, dict], tracked_adapters: list[str], tracked_variables: int,
                 declarations: dict[str, bool]) -> dict:
    """The JSON-serialisable report: interpreter facts, findings, per-method overlap."""
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    return {
        "enabled": enabled,
        "strict_mode": strict_mode,
        "python_version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "gil_enabled": gil_enabled(),
        "free_threaded_build": free_threaded_build(),
        "started_unix": started,
        "generated_unix": time.time(),
        "tracked_adapters": tracked_adapters,
        "tracked_variables": tracked_variables,
        "declarations": declarations,
        "summary": {"findings": len(findings), "by_kind": kinds},
        "findings": findings,
        "methods": methods,
        "concurrent_methods": sorted(k for k, v in methods.items() if v["concurrent"]),
    }


def write_json_file(report: dict, path: str) -> str:
    """Write ``report`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)
    return path
