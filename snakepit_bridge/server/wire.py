"""Large blobs through protobuf without copying them more than once each way.

Protobuf's Python messages hold `bytes` fields in their own memory: parsing a request copies every
blob out of the received buffer, reading the field copies it again, and building a response copies
each blob in and serialising copies it out. For a message of megabytes that is most of the cost
(and of the peak memory). Two facts of the wire format let the blobs bypass the message:

* a message's fields may come in any order, and a repeated field's elements are simply its tagged
  entries: `message.SerializeToString() + <entries of the blob field>` is the message with its blobs;
* a top-level length-delimited field can be found by reading tags and lengths alone.

So a large message is split: `split()` finds the blob field's entries and returns them as
`memoryview`s into the received buffer, and lets protobuf parse the rest (all other fields keep
protobuf's exact semantics); `join()` serialises the small rest with protobuf and appends the blobs
from the caller's buffers (numpy arrays included) in one copy. Below SPLIT_MIN_BYTES nothing here is
used: protobuf's C code is faster on small messages than any Python.
"""
from __future__ import annotations

from typing import Any, Sequence

SPLIT_MIN_BYTES = 64 * 1024
# The blob field of each message that carries tool values in bulk (proto/snakepit_bridge.proto).
REQUEST_BLOB_FIELDS = {"snakepit.bridge.ExecuteToolRequest": 3}
RESPONSE_BLOB_FIELDS = {"snakepit.bridge.ExecuteToolResponse": 2, "snakepit.bridge.ToolChunk": 3}


class WireMessage:
    """A message already serialised (`join`): what a transport sends as it is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name, so serialisers need not care
        return self.data

    def ByteSize(self) -> int:  # noqa: N802
        return len(self.data)


class SplitMessage:
    """A parsed message whose blob field was left in the received buffer: `blobs` are memoryviews
    into it; every other attribute is the protobuf message's (parsed without them)."""

    __slots__ = ("message", "blobs")

    def __init__(self, message: Any, blobs: list[memoryview]) -> None:
        self.message = message
        self.blobs = blobs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def release_blobs(self) -> None:
        """Drop the views, so the received buffer can be freed once the blobs are decoded."""
        self.blobs = []


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def join(message: Any, blob_field: int, blobs: Sequence[Any]) -> WireMessage:
    """`message` (with its blob field empty) serialised, then `blobs` (any buffers) as that field."""
    tag = varint((blob_field << 3) | 2)
    parts: list[Any] = [message.SerializeToString()]
    for blob in blobs:
        view = memoryview(blob)
        parts += (tag, varint(view.nbytes), view if view.contiguous else view.tobytes())
    return WireMessage(b"".join(parts))


def split(data: bytes, message_class: Any, blob_field: int) -> Any:
    """Parse `data` as `message_class`; when it is large, as a SplitMessage whose `blob_field` entries
    are views into `data`. Anything the scan does not understand is left to protobuf whole, so it
    raises protobuf's own error for bytes that do not parse."""
    if len(data) < SPLIT_MIN_BYTES:
        return message_class.FromString(data)
    found = _find_entries(data, blob_field)
    if found is None:
        return message_class.FromString(data)
    spans, blobs = found
    view = memoryview(data)
    rest, position = [], 0
    for start, end in spans:
        rest.append(view[position:start])
        position = end
    rest.append(view[position:])
    return SplitMessage(message_class.FromString(b"".join(rest)), blobs)


def _find_entries(data: bytes, blob_field: int) -> tuple[list[tuple[int, int]], list[memoryview]] | None:
    """The spans (tag included) and payloads of the top-level length-delimited entries of
    `blob_field`, or None when the bytes are not a well-formed sequence of fields."""
    view = memoryview(data)
    size = len(data)
    spans: list[tuple[int, int]] = []
    blobs: list[memoryview] = []
    position = 0
    while position < size:
        start = position
        key, position = _read_varint(data, position)
        if key is None:
            return None
        wire_type, number = key & 7, key >> 3
        if wire_type == 0:
            _, position = _read_varint(data, position)
            if _ is None:
                return None
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _read_varint(data, position)
            if length is None:
                return None
            payload = position
            position += length
            if number == blob_field and position <= size:
                spans.append((start, position))
                blobs.append(view[payload:position])
        else:  # groups (3, 4) and invalid wire types: protobuf decides
            return None
        if position > size or number == 0:
            return None
    return spans, blobs


def _read_varint(data: bytes, position: int) -> tuple[int | None, int]:
    result = shift = 0
    size = len(data)
    while position < size and shift < 64:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
    return None, position
