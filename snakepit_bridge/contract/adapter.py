"""Adapters and the `@tool` decorator.

An adapter is a class whose `@tool` methods are callable remotely. Only marked methods are tools;
private or unmarked methods are NOT_FOUND. Parameters come from the signature and type hints, and
arguments are checked against them before the tool runs (INVALID_ARGUMENT naming the parameter).
Generator methods stream.

    class MyAdapter(BaseAdapter):
        def setup(self):                      # once per process, before serving
            self.weights = load_weights()

        @tool(description="Add two integers")
        def add(self, a: int, b: int) -> int:
            return a + b

        @tool(description="Count up, one chunk per step")
        def count(self, n: int, ctx: RequestContext):
            for i in range(n):
                if ctx.cancelled:
                    return
                yield i
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import types
import typing
from typing import Any, Callable

from .errors import InvalidArgument

TOOL_ATTRIBUTE = "__snakepit_tool__"
CONTEXT_PARAMETER_NAMES = ("ctx", "context")


@dataclasses.dataclass(frozen=True)
class ToolInfo:
    """What `@tool` records on a method."""

    name: str | None
    description: str
    supports_streaming: bool | None


def tool(fn: Callable | None = None, *, description: str = "", supports_streaming: bool | None = None,
         name: str | None = None):
    """Mark an adapter method as a remotely callable tool.

    `supports_streaming` defaults to whether the method is a generator function. `name` defaults to
    the method's name. Returns the function itself, so it composes with other decorators in any order
    (wrappers made with functools.wraps carry the mark along).
    """

    def mark(function: Callable) -> Callable:
        setattr(function, TOOL_ATTRIBUTE, ToolInfo(name, description, supports_streaming))
        return function

    return mark(fn) if fn is not None else mark


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    type_name: str
    required: bool
    default: Any
    check: Callable[[Any, str], Any]  # returns the (possibly converted) value or raises InvalidArgument
    description: str = ""

    @property
    def default_json(self) -> str:
        if self.required:
            return ""
        try:
            return json.dumps(self.default)
        except (TypeError, ValueError):
            return json.dumps(repr(self.default))


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A discovered tool: how to call it and how to describe it."""

    name: str
    method_name: str
    description: str
    streaming: bool
    parameters: tuple[Parameter, ...]
    context_parameter: str | None
    accepts_any_keyword: bool
    # Derived in __post_init__ for the hot path of bind().
    _by_name: dict[str, Parameter] = dataclasses.field(init=False, repr=False, compare=False)
    _has_required: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.parameters})
        object.__setattr__(self, "_has_required", any(p.required for p in self.parameters))

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check `args` against the parameters; returns keyword arguments for the method."""
        if not args and not self._has_required:
            return {}
        by_name = self._by_name
        if not self.accepts_any_keyword:
            unknown = [key for key in args if key not in by_name]
            if unknown:
                expected = ", ".join(by_name) or "none"
                raise InvalidArgument(
                    f"unknown argument '{unknown[0]}' for tool '{self.name}' (parameters: {expected})",
                    field=unknown[0],
                )
        kwargs = {}
        for param in self.parameters:
            if param.name in args:
                where = f"argument '{param.name}' of tool '{self.name}'"
                try:
                    kwargs[param.name] = param.check(args[param.name], where)
                except (ValueError, TypeError, OverflowError) as exc:  # a conversion the checks did not foresee
                    raise InvalidArgument(f"{where} cannot be used: {type(exc).__name__}: {exc}",
                                          field=param.name) from None
            elif param.required:
                raise InvalidArgument(
                    f"missing required argument '{param.name}' ({param.type_name}) for tool '{self.name}'",
                    field=param.name,
                )
        if self.accepts_any_keyword:
            for key, value in args.items():
                if key not in by_name:
                    kwargs[key] = value
        return kwargs


class BaseAdapter:
    """Base class of every adapter. One instance serves all requests of a server process.

    Override `setup()` to load models once (it runs after construction, before serving) and
    `teardown()` to release them at shutdown.

    `__fork_preload__ = True` lets a fork server (`--fork-server`) run setup() once, before it forks its
    workers, instead of once in each worker: only for a setup() whose state survives fork (Python and
    numpy data, files; not thread pools of OpenMP/MKL/torch, not CUDA). See server/forkserver.py.
    """

    __fork_preload__: bool = False

    def __init__(self) -> None:
        self.server_info = None

    def bind_server(self, info: Any) -> None:
        """Called by the server before `setup()` with its `ServerInfo` (max_workers, worker_mode)."""
        self.server_info = info

    def setup(self) -> None:
        """Load what every request needs; runs once per process before serving."""

    def teardown(self) -> None:
        """Release resources; runs once at shutdown after in-flight calls finished."""

    @classmethod
    def tool_specs(cls) -> dict[str, ToolSpec]:
        """The tools of this adapter class, by name (cached per class)."""
        cached = cls.__dict__.get("_snakepit_tool_specs")
        if cached is None:
            cached = discover_tools(cls)
            setattr(cls, "_snakepit_tool_specs", cached)
        return cached


def discover_tools(cls: type) -> dict[str, ToolSpec]:
    specs: dict[str, ToolSpec] = {}
    for attribute in dir(cls):
        if attribute.startswith("_"):
            continue  # private methods are never remotely callable, marked or not
        member = inspect.getattr_static(cls, attribute, None)
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        info = getattr(member, TOOL_ATTRIBUTE, None)
        if not isinstance(info, ToolInfo) or not callable(member):
            continue
        spec = _build_spec(attribute, member, info)
        if spec.name in specs:
            raise TypeError(f"{cls.__name__}: two methods expose the tool name '{spec.name}'")
        specs[spec.name] = spec
    return specs


def _build_spec(method_name: str, function: Callable, info: ToolInfo) -> ToolSpec:
    unwrapped = inspect.unwrap(function)
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(unwrapped)
    except Exception:  # unresolvable forward references: fall back to no hints
        hints = {}
    params: list[Parameter] = []
    context_parameter = None
    accepts_any_keyword = False
    for index, (pname, p) in enumerate(signature.parameters.items()):
        if index == 0 and pname in ("self", "cls"):
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_any_keyword = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        hint = hints.get(pname, p.annotation)
        if _is_context_hint(hint) or (pname in CONTEXT_PARAMETER_NAMES and hint is inspect.Parameter.empty):
            context_parameter = pname
            continue
        required = p.default is inspect.Parameter.empty
        check, type_name = checker_for(hint)
        params.append(Parameter(pname, type_name, required, None if required else p.default, check))
    streaming = info.supports_streaming
    if streaming is None:
        streaming = inspect.isgeneratorfunction(unwrapped)
    description = info.description or inspect.cleandoc(unwrapped.__doc__ or "").split("\n\n")[0]
    return ToolSpec(info.name or method_name, method_name, description, bool(streaming), tuple(params),
                    context_parameter, accepts_any_keyword)


def _is_context_hint(hint: Any) -> bool:
    from .context import RequestContext

    if isinstance(hint, str):
        return hint.replace(" ", "").split(".")[-1] in ("RequestContext", "RequestContext|None")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `RequestContext | None = None`
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        return len(members) == 1 and _is_context_hint(members[0])
    return isinstance(hint, type) and issubclass(hint, RequestContext)


# --- argument checking -------------------------------------------------------------------------

def _type_error(where: str, expected: str, value: Any) -> InvalidArgument:
    field = where.split("'")[1] if "'" in where else where
    return InvalidArgument(f"{where} must be {expected}, got {_describe(value)}", field=field)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _accept(value, where):
    return value


# Types taken as they are, no conversion: bool is not an int here, and an int is not a string.
_EXACT_TYPES = {int: "an integer", bool: "a boolean", str: "a string"}


def _exact_type_checker(expected_type: type, expected: str) -> Callable[[Any, str], Any]:
    def check_exact(value, where):
        if type(value) is expected_type:
            return value
        raise _type_error(where, expected, value)

    return check_exact


def checker_for(hint: Any) -> tuple[Callable[[Any, str], Any], str]:
    """A checker (value, where) -> value for a type hint, and the hint's readable name."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object or isinstance(hint, (str, typing.TypeVar)):
        return _accept, "any" if not isinstance(hint, str) else hint
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = typing.get_args(hint)
        checks = [checker_for(m) for m in members if m is not type(None)]
        allows_none = type(None) in members
        name = " | ".join([n for _, n in checks] + (["None"] if allows_none else []))

        def check_union(value, where):
            if value is None and allows_none:
                return None
            for check, _ in checks:
                try:
                    return check(value, where)
                except InvalidArgument:
                    pass
            raise _type_error(where, name, value)

        return check_union, name
    if origin is typing.Literal:
        allowed = typing.get_args(hint)

        def check_literal(value, where):
            if value in allowed and type(value) in {type(a) for a in allowed}:
                return value
            raise _type_error(where, "one of " + ", ".join(map(repr, allowed)), value)

        return check_literal, "one of " + ", ".join(map(repr, allowed))
    if isinstance(hint, type) and hint in _EXACT_TYPES:
        return _exact_type_checker(hint, _EXACT_TYPES[hint]), hint.__name__
    if hint is float:
        def check_float(value, where):
            if type(value) is float:
                return value
            if type(value) is int:
                try:
                    return float(value)
                except OverflowError:
                    raise _type_error(where, "a number within the float range", value) from None
            raise _type_error(where, "a number", value)

        return check_float, "float"
    if hint in (bytes, bytearray):
        def check_bytes(value, where):
            if type(value) is bytes:
                return value if hint is bytes else bytearray(value)
            raise _type_error(where, "bytes", value)

        return check_bytes, "bytes"
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence, typing.List, typing.Tuple):
        args = typing.get_args(hint)
        item_check, item_name = checker_for(args[0]) if args and args[0] is not Ellipsis else (_accept, "any")
        if container is tuple and len(args) >= 1 and (len(args) == 1 or args[1] is not Ellipsis):
            item_check, item_name = _accept, "any"  # fixed-shape tuples: length and per-slot types vary
        name = "list" if item_check is _accept else f"list[{item_name}]"

        def check_list(value, where):
            if type(value) is not list:
                raise _type_error(where, "a list", value)
            if item_check is _accept:
                return value if container is not tuple else tuple(value)
            checked = [item_check(item, f"{where} item {i}") for i, item in enumerate(value)]
            return checked if container is not tuple else tuple(checked)

        return check_list, name
    if container in (dict, collections.abc.Mapping, collections.abc.MutableMapping, typing.Dict):
        args = typing.get_args(hint)
        value_check, value_name = checker_for(args[1]) if len(args) == 2 else (_accept, "any")
        name = "dict" if value_check is _accept else f"dict[str, {value_name}]"

        def check_dict(value, where):
            if type(value) is not dict:
                raise _type_error(where, "a map", value)
            if value_check is _accept:
                return value
            return {k: value_check(v, f"{where} key '{k}'") for k, v in value.items()}

        return check_dict, name
    if _is_ndarray_type(hint):
        def check_array(value, where):
            import numpy as np

            if isinstance(value, np.ndarray):
                return value
            if type(value) is list:
                try:
                    array = np.asarray(value)
                except ValueError as exc:
                    raise _type_error(where, f"an array ({exc})", value) from None
                if array.dtype.hasobject:
                    raise _type_error(where, "a numeric array", value)
                return array
            raise _type_error(where, "an ndarray or a list of numbers", value)

        return check_array, "ndarray"
    return _accept, getattr(hint, "__name__", str(hint))


def _is_ndarray_type(hint: Any) -> bool:
    module = getattr(hint, "__module__", "") or ""
    return getattr(hint, "__name__", "") == "ndarray" and module.startswith("numpy") or (
        typing.get_origin(hint) is not None and _is_ndarray_type(typing.get_origin(hint))
    )
