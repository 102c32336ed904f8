"""The adapter contract: what an adapter author writes against, and all the server needs to know of it.

- `adapter`: `BaseAdapter`, the `@tool` decorator, and the `ToolSpec` read from each tool's signature
  (names, types, streaming) that the server validates arguments with and reports in tool discovery.
- `context`: `RequestContext`, what a tool sees of its call (request id, session, deadline, rng).
- `errors`: `ToolError` (a tool picks its caller's status) and the bridge's own status errors.

Nothing here imports the server: the server depends on the contract, never the other way round.
"""
from .adapter import BaseAdapter, ToolSpec, discover_tools, tool
from .context import RequestContext
from .errors import BridgeError, ToolError

__all__ = ["BaseAdapter", "BridgeError", "RequestContext", "ToolError", "ToolSpec", "discover_tools", "tool"]
