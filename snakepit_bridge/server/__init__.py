"""The gRPC worker server (`snakepit.bridge.BridgeService`), its Python client, and the wire encoding.

One job per module, in the order a call meets them:
- `main`: the entry points (`grpc_server_threaded.py`, `grpc_server_process.py`, `snakepit-*` scripts).
- `settings`: the two modes (threaded, process) and their flags. `worker`: one serving process's life
  (adapter, grpc server, health, reflection, readiness line, shutdown). `prefork`: several of them on
  one port.
- `auth`: the bearer token check. `calls`: per-connection call caps and the send watchdog. `gate`: tool
  slots and the wait queue. `servicer`: the RPC handlers. `toolcall`: one tool call's life, the same
  for unary, streaming and batch calls. `failures`: every failure's status, once.
- `codec`: values <-> JSON + blobs. `sessions`: session store and checkpoints. `stats`: GetStats.
  `logs`: request-id log lines. `client`: `BridgeClient`, the Python caller.

This package's `__init__` imports nothing, so `snakepit_bridge.client` does not load the server.
"""
