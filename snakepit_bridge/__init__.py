"""snakepit_bridge: a Python gRPC worker server that Elixir applications pool and call.

Write an adapter (`BaseAdapter` with `@tool` methods, or `ThreadSafeAdapter` for threaded serving),
then serve it with `grpc_server_threaded.py` or `grpc_server_process.py`.
"""
from .contract.adapter import BaseAdapter, tool
from .contract.context import RequestContext
from .contract.errors import StatusCode, ToolError

__all__ = ["BaseAdapter", "RequestContext", "StatusCode", "ToolError", "tool"]
__version__ = "0.1.0"
