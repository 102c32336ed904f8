"""W3C trace context (https://www.w3.org/TR/trace-context/): the caller's `traceparent` header, read
from the call's gRPC metadata, goes into the tool's RequestContext and into every log line of the
call (`[<request id> trace=<trace id>]`), so one slow call can be followed across the Elixir and
Python logs by its trace id.

A header that does not parse is ignored, as the recommendation says (the call is served, untraced).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

HEADER = "traceparent"
# version 00: exactly four fields; a later version may add fields after the flags
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True)
class TraceParent:
    version: str
    trace_id: str
    parent_id: str
    flags: str

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    @property
    def header(self) -> str:
        return f"{self.version}-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse(value: str | bytes | None) -> TraceParent | None:
    """The traceparent in `value`, or None when it is absent or invalid."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(value) > 512:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return TraceParent(version, trace_id, parent_id, flags)


def from_context(context) -> TraceParent | None:
    """The traceparent of a call, from its invocation metadata (either transport)."""
    metadata = getattr(context, "invocation_metadata", None)
    if metadata is None:
        return None
    for key, value in metadata() or ():
        if key == HEADER:
            return parse(value)
    return None
