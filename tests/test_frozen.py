"""Specification of snakepit_bridge.frozen: immutable contexts and read-only mappings."""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing as mp
import pickle
import threading
import types

import pytest

from snakepit_bridge.frozen import Frozen, FrozenError, freeze, frozen_mapping, is_frozen, thaw


# ---------------------------------------------------------------------------
# FLAWED REFERENCE -- ProcessingContext from openhcs-concurrency-model.rst.
# Kept only to show its flaws side by side with the fix.  Do not use.
# ---------------------------------------------------------------------------
class _FlawedDocProcessingContext:
    def __init__(self, step_plans):
        self.step_plans = step_plans

    def freeze(self):
        self._is_frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_is_frozen", False) and name != "_is_frozen":  # FLAW: may be unset
            raise AttributeError(f"Cannot modify '{name}' of frozen ProcessingContext")
        super().__setattr__(name, value)
    # FLAW: no __delattr__; FLAW: nested dicts stay mutable
# --------------------------- end of flawed reference -------------------------


class Ctx(Frozen):
    def __init__(self, request_id: str, metadata: dict, plans: list | None = None):
        self.request_id = request_id
        self.metadata = frozen_mapping(metadata)
        self.plans = tuple(plans or ())


class SlottedCtx(Frozen):
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a = a
        self.b = b


class ChildCtx(Ctx):
    def __init__(self, request_id, metadata, extra):
        super().__init__(request_id, metadata)  # still mutable here: freezing waits for the outermost init
        self.extra = extra


@dataclasses.dataclass
class DataCtx(Frozen):
    x: int
    tags: tuple = ()


class Built(Frozen, auto_freeze=False):
    pass


def test_unfreezable_deletable_nested_mutable_context_is_fixed():
    flawed = _FlawedDocProcessingContext({0: {"op": "blur"}})
    flawed.freeze()
    with pytest.raises(AttributeError):
        flawed.step_plans = {}
    del flawed.step_plans[0]  # nested state still mutable
    flawed._is_frozen = False  # anyone can unfreeze it
    flawed.step_plans = {"replaced": True}
    del flawed.step_plans  # and delete attributes
    assert not hasattr(flawed, "step_plans")

    ctx = Ctx("r1", {"plans": {0: {"op": "blur"}}, "tags": ["a"]})
    with pytest.raises(FrozenError):
        ctx.metadata = {}
    with pytest.raises(FrozenError):
        del ctx.request_id
    with pytest.raises(FrozenError):
        ctx._Frozen__frozen = False  # no unfreezing
    with pytest.raises(TypeError):
        ctx.metadata["plans"][0]["op"] = "sharpen"  # nested mappings are read-only
    with pytest.raises(AttributeError):
        ctx.metadata["tags"].append("b")  # lists became tuples
    assert ctx.request_id == "r1" and thaw(ctx.metadata) == {"plans": {0: {"op": "blur"}}, "tags": ["a"]}


def test_errors_name_the_attribute_and_are_attribute_errors():
    ctx = Ctx("r1", {})
    with pytest.raises(FrozenError) as info:
        ctx.request_id = "r2"
    assert info.value.name == "request_id" and "request_id" in str(info.value)
    assert isinstance(info.value, AttributeError)
    with pytest.raises(FrozenError, match="delete"):
        del ctx.plans
    with pytest.raises(FrozenError):
        ctx.new_attribute = 1
    # the lead's RequestContext raises it with a plain message
    assert str(FrozenError("RequestContext is frozen")) == "RequestContext is frozen"


def test_frozen_after_construction_for_every_kind_of_init():
    for obj, attr in (
        (Ctx("r", {}), "request_id"),
        (SlottedCtx(1, 2), "a"),
        (ChildCtx("r", {}, extra=3), "extra"),
        (DataCtx(1), "x"),
    ):
        assert is_frozen(obj), type(obj)
        with pytest.raises(FrozenError):
            setattr(obj, attr, 99)
    assert ChildCtx("r", {}, extra=3).extra == 3  # subclass init ran completely before freezing


def test_explicit_freeze_for_build_then_publish():
    b = Built()
    b.x = 1
    assert not is_frozen(b)
    assert freeze(b) is b and is_frozen(b)
    with pytest.raises(FrozenError):
        b.x = 2
    with pytest.raises(TypeError):
        freeze(object())


def test_frozen_mapping_is_a_snapshot():
    source = {"a": {"b": 1}, "s": {1, 2}}
    fm = frozen_mapping(source)
    assert isinstance(fm, types.MappingProxyType)
    source["a"]["b"] = 2
    source["new"] = 1
    assert fm["a"]["b"] == 1 and "new" not in fm
    assert fm["s"] == frozenset({1, 2})
    shallow = frozen_mapping({"a": {"b": 1}}, deep=False)
    assert isinstance(shallow["a"], dict)
    assert json.dumps(thaw(fm), default=sorted) == '{"a": {"b": 1}, "s": [1, 2]}'
    with pytest.raises(TypeError):
        frozen_mapping([1, 2])  # type: ignore[arg-type]


def test_pickle_and_copy_keep_objects_frozen():
    ctx = Ctx("r9", {"k": {"n": [1, 2]}}, plans=[1])
    for clone in (pickle.loads(pickle.dumps(ctx)), copy.copy(ctx), copy.deepcopy(ctx)):
        assert is_frozen(clone)
        assert clone.request_id == "r9" and clone.plans == (1,)
        assert isinstance(clone.metadata, types.MappingProxyType)
        assert isinstance(clone.metadata["k"], types.MappingProxyType)
        assert clone.metadata["k"]["n"] == (1, 2)
        with pytest.raises(FrozenError):
            clone.request_id = "x"
    s = pickle.loads(pickle.dumps(SlottedCtx(1, [2])))
    assert (s.a, s.b, is_frozen(s)) == (1, [2], True)
    unfrozen = pickle.loads(pickle.dumps(Built()))
    assert not is_frozen(unfrozen)


# --- thread and process stress ------------------------------------------------------------
def test_threads_cannot_change_a_shared_frozen_context():
    ctx = Ctx("r1", {"user": {"id": 7}}, plans=[1, 2, 3])
    failures = {"set": 0, "del": 0, "nested": 0}
    lock = threading.Lock()
    seen: set = set()

    def attacker():
        local = {"set": 0, "del": 0, "nested": 0}
        for i in range(500):
            try:
                ctx.request_id = f"r{i}"
            except FrozenError:
                local["set"] += 1
            try:
                del ctx.plans
            except FrozenError:
                local["del"] += 1
            try:
                ctx.metadata["user"]["id"] = i  # type: ignore[index]
            except TypeError:
                local["nested"] += 1
        with lock:
            for k in failures:
                failures[k] += local[k]

    def reader():
        for _ in range(2000):
            snapshot = (ctx.request_id, ctx.plans, ctx.metadata["user"]["id"])
            with lock:
                seen.add(snapshot)

    threads = [threading.Thread(target=attacker) for _ in range(6)] + [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert failures == {"set": 3000, "del": 3000, "nested": 3000}
    assert seen == {("r1", (1, 2, 3), 7)}


def _child_try_mutate(ctx, q) -> None:
    result = [is_frozen(ctx), ctx.request_id, ctx.metadata["k"]["n"]]
    try:
        ctx.request_id = "changed"
        result.append("mutated")
    except FrozenError:
        result.append("refused")
    q.put(result)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_frozen_context_stays_frozen_in_other_processes(method):
    ctx = Ctx("r5", {"k": {"n": 1}})
    mpctx = mp.get_context(method)
    q = mpctx.Queue()
    procs = [mpctx.Process(target=_child_try_mutate, args=(ctx, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results == [[True, "r5", 1, "refused"]] * 4


class Hinted(Frozen, frozen_hint="build a new one instead"):
    def __init__(self, x):
        self.x = x


class HintedChild(Hinted):
    pass


def test_a_frozen_hint_ends_every_error_message_and_is_inherited():
    for obj in (Hinted(1), HintedChild(1)):
        with pytest.raises(FrozenError, match=r"assign to attribute 'x' .*\(build a new one instead\)$"):
            obj.x = 2
        with pytest.raises(FrozenError, match=r"delete attribute 'x' .*\(build a new one instead\)$"):
            del obj.x
    with pytest.raises(FrozenError) as info:
        Ctx("r1", {}).request_id = "r2"
    assert "(" not in str(info.value)  # no hint, no parenthesis


def test_the_request_context_is_a_frozen_object():
    from snakepit_bridge import RequestContext

    ctx = RequestContext(request_id="r1", tool_name="t", session_id="s", metadata={"k": "v"}, seed=5)
    assert isinstance(ctx, Frozen) and is_frozen(ctx)
    for change in (lambda: setattr(ctx, "session_id", "s2"), lambda: setattr(ctx, "anything", 1),
                   lambda: delattr(ctx, "request_id"), lambda: setattr(ctx, "_rng", None)):
        with pytest.raises(FrozenError) as info:
            change()
        assert info.value.name in str(info.value) and "ctx.session" in str(info.value)
    with pytest.raises(TypeError):
        ctx.metadata["k"] = "w"  # type: ignore[index]
    assert ctx.rng is ctx.rng  # the lazily made RNG is still set once, past the freeze
    assert (ctx.request_id, ctx.tool_name, ctx.session_id, ctx.seed, dict(ctx.metadata)) == (
        "r1", "t", "s", 5, {"k": "v"})
