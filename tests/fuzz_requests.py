"""Seeded mutation fuzzing of a worker server: what `tests/test_server_fuzz.py` runs bounded in the
suite and `bench/fuzz.py` runs long.

Requests start from valid ExecuteTool, ExecuteBatch and InitializeSession messages for the
SpecAdapter's value tools (`echo`, `typed`, `noop`, `session_get`) and are mutated at three levels:
the JSON of the arguments (values swapped for hostile ones: deep nesting, integers past the digit
limit, lone surrogates, malformed tags, long keys), the request's own fields (tool names, session
and request ids, blobs, TTLs), and the serialized protobuf bytes (flips, cuts, insertions). Every
answer must be OK or a status that blames the request: never UNKNOWN or INTERNAL, never slow.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from snakepit_bridge import codec
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb

SERVICE = "/snakepit.bridge.BridgeService/"
SERVER_FAULT_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

HOSTILE_VALUES = [
    lambda r: "\ud800" * r.randint(1, 3),
    lambda r: "x" * r.choice([1000, 70_000]),
    lambda r: {"__snakepit__": r.choice(["bytes", "ndarray", "float", "object", "nope", None, 7])},
    lambda r: {"__snakepit__": "ndarray", "blob": 0, "dtype": r.choice(["<f8", "V0", "S0", "(2,)<f8", "<i4,<f8", "O", "(((", 3, ""]),
               "shape": r.choice([[1], [0, 10 ** 30], [1] * 65, [-1], "3", [2 ** 62, 2 ** 62], []])},
    lambda r: {"__snakepit__": "bytes", "blob": r.choice([-1, 0, 1, 10 ** 20, "0", None])},
    lambda r: {"__snakepit__": "float", "value": r.choice(["nan", "inf", "-inf", "NaN", 1.5, None])},
    lambda r: {"__snakepit__": "object", "value": r.choice([{}, [], "v", {"__snakepit__": "bytes", "blob": 9}])},
    lambda r: _nested(r.choice([10, 255, 257, 600])),
    lambda r: 10 ** r.choice([18, 19, 400, 4299]),
    lambda r: -(2 ** 63),
    lambda r: r.choice([float("1e308"), -0.0, 5e-324]),
    lambda r: {"k" * r.choice([64, 5000]): [0] * r.choice([10, 3000])},
    lambda r: [None, True, 1, 1.5, "s", [], {}],
]


def _nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _valid_args(r: random.Random) -> tuple[str, dict]:
    tool = r.choice(["echo", "echo", "typed", "noop", "session_get"])
    if tool == "echo":
        return tool, {"a": r.randint(-5, 5), "b": [1.5, "two", None], "c": {"d": b"\x00\x01"}}
    if tool == "typed":
        import numpy as np

        return tool, {"i": 1, "f": 2.5, "flag": True, "s": "s", "raw": b"r", "ints": [1, 2], "mapping": {"m": 1},
                      "arr": np.arange(4, dtype=np.float32)}
    if tool == "session_get":
        return tool, {"key": "k"}
    return tool, {}


def _mutate_tree(r: random.Random, tree):
    """Replace one random node of a decoded value tree with a hostile value."""
    if isinstance(tree, dict) and tree and r.random() < 0.7:
        key = r.choice(list(tree))
        if r.random() < 0.2:
            tree[r.choice(["\ud800", "", "k" * 3000, "__snakepit__", "a\nb"])] = tree.pop(key)
        else:
            tree[key] = _mutate_tree(r, tree[key])
        return tree
    if isinstance(tree, list) and tree and r.random() < 0.7:
        index = r.randrange(len(tree))
        tree[index] = _mutate_tree(r, tree[index])
        return tree
    return r.choice(HOSTILE_VALUES)(r)


def _mutate_json(r: random.Random, args: dict) -> tuple[str, list[bytes]]:
    text, blobs = codec.encode(args)
    roll = r.random()
    if roll < 0.55:
        tree = _mutate_tree(r, json.loads(text))
        try:
            text = json.dumps(tree, ensure_ascii=r.random() < 0.5)
        except ValueError:  # an integer past the digit limit: write it by hand
            text = '{"a": ' + "9" * 5000 + "}"
    elif roll < 0.75 and text:
        cut = r.randrange(len(text))
        text = text[:cut] + r.choice(["", "{", "]", "\\ud800", '"', "\x00", "1e999999"]) + text[cut + 1:]
    elif roll < 0.85:
        text = r.choice(["[]", "null", "1", '"s"', "[" * 2000, '{"a":' * 600, "{" + '"k": 1,' * 5000 + '"z": 0}'])
    if r.random() < 0.3:
        blobs = r.choice([[], [b""], [b"\x00" * r.choice([1, 7, 64, 100_000])], blobs * 3])
    return text, blobs


@dataclass
class FuzzCase:
    method: str           # BridgeService method name
    payload: bytes        # the serialized request, possibly mutated


def make_case(r: random.Random) -> FuzzCase:
    method = r.choices(["ExecuteTool", "ExecuteBatch", "InitializeSession"], weights=[6, 2, 2])[0]
    tool, args = _valid_args(r)
    if method == "ExecuteTool":
        args_json, blobs = _mutate_json(r, args) if r.random() < 0.8 else codec.encode(args)
        fields = {"tool_name": tool, "args_json": args_json, "blobs": blobs}
        if r.random() < 0.3:
            fields["session_id"] = r.choice(["", "s1", "a\n", "x" * 200, "\ud800", "../../etc/passwd"])
        if r.random() < 0.2:
            fields["request_id"] = r.choice(["r\nFORGED", "z" * 100_000, "\x1b[31m", "ok-1"])
        if r.random() < 0.1:
            fields["tool_name"] = r.choice(["", "t" * 20_000, "\ud800", "_private_tool", "countdown", "__init__"])
        if r.random() < 0.1:
            fields["metadata"] = {"k" * r.choice([1, 500]): "v\n" * r.choice([1, 500])}
        payload = _serialize(pb.ExecuteToolRequest, fields)
    elif method == "ExecuteBatch":
        items = b""
        for _ in range(r.randint(1, 5)):
            args_json, blobs = _mutate_json(r, args) if r.random() < 0.6 else codec.encode(args)
            item = _serialize(pb.BatchItem, {"args_json": args_json, "blobs": blobs})
            items += _varint(2 << 3 | 2) + _varint(len(item)) + item  # field 2: items
        payload = _serialize(pb.ExecuteBatchRequest, {"tool_name": tool, "max_parallelism": r.choice([0, 1, 2, 1000])})
        payload += items
    else:
        state_json, blobs = _mutate_json(r, {"count": 1, "name": "n"})
        payload = _serialize(pb.InitializeSessionRequest, {
            "session_id": r.choice(["", f"s{r.randrange(50)}", "a\n", "x" * 129, "\ud800", "ok.session:1"]),
            "state_json": state_json, "blobs": blobs,
            "ttl_seconds": r.choice([0, 1, 60, 86_400, 86_401, 2 ** 31 - 1])})
    if r.random() < 0.25:
        payload = _mutate_bytes(r, payload)
    return FuzzCase(method, payload)


def _serialize(message_class, fields: dict) -> bytes:
    """The message's bytes; string fields protobuf refuses (lone surrogates) are written by hand."""
    raw = b""
    clean = {}
    for name, value in fields.items():
        if isinstance(value, str) and not _utf8_ok(value):
            number = message_class.DESCRIPTOR.fields_by_name[name].number
            data = value.encode("utf-8", "surrogatepass")
            raw += _varint(number << 3 | 2) + _varint(len(data)) + data
        else:
            clean[name] = value
    return message_class(**clean).SerializeToString() + raw


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _mutate_bytes(r: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(r.randint(1, 4)):
        roll = r.random()
        if not data or roll < 0.3:
            data[r.randrange(len(data) + 1):0] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
        elif roll < 0.6:
            data[r.randrange(len(data))] = r.randrange(256)
        elif roll < 0.8:
            del data[r.randrange(len(data)):]
        else:
            data[r.randrange(len(data))] ^= 1 << r.randrange(8)
    return bytes(data)


@dataclass
class FuzzReport:
    calls: int = 0
    codes: Counter = field(default_factory=Counter)
    item_codes: Counter = field(default_factory=Counter)
    slowest: float = 0.0
    server_faults: list = field(default_factory=list)  # (method, code, details) of UNKNOWN/INTERNAL answers
    slow: list = field(default_factory=list)           # (method, seconds)

    def table(self) -> str:
        rows = [f"| {code} | {count} |" for code, count in self.codes.most_common()]
        items = [f"| item {code} | {count} |" for code, count in self.item_codes.most_common()]
        return "\n".join(["| status | calls |", "|---|---:|", *rows, *items])


def run(address: str, count: int, seed: int, *, slow_after: float = 2.0, deadline_s: float | None = None) -> FuzzReport:
    """Send `count` fuzzed requests (stopping early at `deadline_s` seconds) and report what came back."""
    r = random.Random(seed)
    report = FuzzReport()
    started = time.monotonic()
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        calls = {m: channel.unary_unary(SERVICE + m, request_serializer=None, response_deserializer=None)
                 for m in ("ExecuteTool", "ExecuteBatch", "InitializeSession")}
        for _ in range(count):
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                break
            case = make_case(r)
            t0 = time.monotonic()
            try:
                response = calls[case.method](case.payload, timeout=10)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as error:
                response, code, details = None, error.code(), error.details() or ""
            took = time.monotonic() - t0
            report.calls += 1
            report.codes[code.name] += 1
            report.slowest = max(report.slowest, took)
            if took > slow_after:
                report.slow.append((case.method, round(took, 3)))
            if code in SERVER_FAULT_CODES:
                report.server_faults.append((case.method, code.name, details[:300]))
            if response is not None and case.method == "ExecuteBatch":
                for result in pb.ExecuteBatchResponse.FromString(response).results:
                    if not result.ok:
                        item_code = grpc.StatusCode.OK
                        for status in grpc.StatusCode:
                            if status.value[0] == result.error.code:
                                item_code = status
                        report.item_codes[item_code.name] += 1
                        if item_code in SERVER_FAULT_CODES:
                            report.server_faults.append(("ExecuteBatch item", item_code.name, result.error.message[:300]))
    return report
