#!/usr/bin/env python3
"""A small grpcio BridgeService used by the Elixir transport tests (not the project's server).

Binds 127.0.0.1 on an ephemeral port, prints "READY port=<port> pid=<pid>" and serves until its
stdin closes (so it never outlives the test VM that started it).
"""
import hashlib
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc

# The checkout this file belongs to (elixir_client/test/support/ -> the repository root).
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
from snakepit_bridge.generated import snakepit_bridge_pb2 as pb  # noqa: E402
from snakepit_bridge.generated import snakepit_bridge_pb2_grpc as pb_grpc  # noqa: E402

MAX_MESSAGE = 64 * 1024 * 1024
cancelled_ids = set()
lock = threading.Lock()


def watch_cancel(request, context):
    """Records request.request_id if the RPC ends before the handler finished (client RST_STREAM,
    deadline, disconnect). Returns a dict whose "ok" the handler sets when it finishes normally."""
    done = {"ok": False}

    def on_end():
        if not done["ok"]:
            with lock:
                cancelled_ids.add(request.request_id)

    context.add_callback(on_end)
    return done


class Servicer(pb_grpc.BridgeServiceServicer):
    def Ping(self, request, context):
        return pb.PingResponse(message=request.message, server_time_unix_ms=int(time.time() * 1000),
                               pid=os.getpid(), worker_mode="test", adapter="bridge_test_server")

    def ExecuteTool(self, request, context):
        args = json.loads(request.args_json or "{}")
        name = request.tool_name
        if name == "echo":
            return pb.ExecuteToolResponse(result_json=request.args_json, blobs=request.blobs,
                                          request_id=request.request_id, duration_ms=0.5)
        if name == "metadata":
            md = {k: (v if isinstance(v, str) else v.hex()) for k, v in context.invocation_metadata()}
            return pb.ExecuteToolResponse(result_json=json.dumps(md))
        if name == "time_remaining":
            return pb.ExecuteToolResponse(result_json=json.dumps(context.time_remaining()))
        if name == "sleep":
            done = watch_cancel(request, context)
            deadline = time.monotonic() + args.get("ms", 1000) / 1000.0
            while time.monotonic() < deadline and context.is_active():
                time.sleep(0.005)
            done["ok"] = context.is_active()
            return pb.ExecuteToolResponse(result_json='"slept"')
        if name == "was_cancelled":
            with lock:
                return pb.ExecuteToolResponse(result_json=json.dumps(args["request_id"] in cancelled_ids))
        if name == "fail":
            err = pb.ToolError(code=args.get("code", 2), type="ValueError", message=args.get("message", "boom"),
                               traceback="Traceback (most recent call last): ...", tool_name=name)
            context.set_trailing_metadata((("snakepit-error-bin", err.SerializeToString()),
                                           ("x-plain", "plain-value")))
            context.abort(grpc.StatusCode(_code_tuple(args.get("code", 2))), args.get("message", "boom"))
        if name == "big":
            size = args["size"]
            blob = (bytes(range(256)) * (size // 256 + 1))[:size]
            return pb.ExecuteToolResponse(result_json=json.dumps(size), blobs=[blob])
        if name == "digest":
            return pb.ExecuteToolResponse(result_json=json.dumps(
                [[len(b), hashlib.sha256(b).hexdigest()] for b in request.blobs]))
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown tool %r" % name)

    def ExecuteStreamingTool(self, request, context):
        args = json.loads(request.args_json or "{}")
        n = args.get("n", 3)
        delay = args.get("delay_ms", 0) / 1000.0
        size = args.get("size", 0)
        done = watch_cancel(request, context)
        for i in range(n):
            if request.tool_name == "fail_midway" and i == args.get("fail_at", 2):
                context.abort(grpc.StatusCode.INTERNAL, "failed at %d" % i)
            yield pb.ToolChunk(sequence=i, data_json=json.dumps(i), blobs=[b"x" * size] if size else [])
            if delay:
                time.sleep(delay)
        done["ok"] = True
        yield pb.ToolChunk(sequence=n, data_json='"end"', is_final=True)

    def GetStats(self, request, context):
        return pb.GetStatsResponse(requests_total=7, uptime_seconds=1.5, worker_mode="test", pid=os.getpid(),
                                   tools=[pb.ToolStats(name="echo", calls=3, mean_ms=0.25)])


def _code_tuple(code):
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.value
    return grpc.StatusCode.UNKNOWN.value


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_MESSAGE)])
    pb_grpc.add_BridgeServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if len(sys.argv) > 2 and sys.argv[1] == "--unix":
        server.add_insecure_port("unix:" + sys.argv[2])
    server.start()
    print("READY port=%d pid=%d" % (port, os.getpid()), flush=True)
    sys.stdin.read()  # returns at EOF: the test VM closed the port
    server.stop(0)
    os._exit(0)


if __name__ == "__main__":
    main()
