"""`grpc_server_process.py --processes N`: N pre-forked processes sharing one TCP port (not a --uds
socket: Unix sockets have no SO_REUSEPORT, and the flags refuse the two together).

The pattern of grpc's multiprocessing example: the parent reserves the port with SO_REUSEPORT and
forks before any grpc server exists; each child builds its own server on that port with
SO_REUSEPORT, and the kernel spreads connections over them. The parent prints the readiness line once
every child serves, restarts a child that dies, and on SIGTERM/SIGINT/stdin EOF stops them all
gracefully.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

from .endpoint import Endpoint
from .parent_death import die_with_parent
from .worker import StartupError, Worker, announce_ready, install_stop_triggers, start_serving

log = logging.getLogger("snakepit_bridge.server")
STARTUP_TIMEOUT_SECONDS = 120.0
RESTART_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)


def _child_main(settings, index: int, port: int, conn, parent: int) -> None:
    # SIGTERM: the child drains like its siblings do when the parent stops them.
    die_with_parent(signal.SIGTERM, parent)
    settings.args.port = port
    worker = Worker(settings, worker_index=index, reuse_port=True)
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us with SIGTERM
    try:
        start_serving(worker)
    except StartupError as exc:
        conn.send(("error", index, str(exc)))
        os._exit(1)
    except Exception as exc:
        conn.send(("error", index, f"{type(exc).__name__}: {exc}"))
        os._exit(1)
    conn.send(("ready", index, os.getpid()))
    while not worker.stop_requested.wait(0.5):
        pass
    worker.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # A plain bind first: it fails against any listener, SO_REUSEPORT or not, so a port already
    # served by another pre-forked server is a clash instead of silently shared.
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind((host, port))
        port = probe.getsockname()[1]
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve_preforked(settings, ready_nonce: str | None = None) -> int:
    args = settings.args
    try:
        reservation = _reserve_port(args.host, args.port)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    port = reservation.getsockname()[1]
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    children: dict[int, multiprocessing.process.BaseProcess] = {}
    restarts: dict[int, int] = {}

    def spawn(index: int) -> None:
        child = context.Process(target=_child_main, args=(settings, index, port, sender, os.getpid()),
                                name=f"snakepit-worker-{index}", daemon=False)
        child.start()
        children[index] = child

    def stop_all() -> None:
        for child in children.values():
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + args.grace + 5.0
        for child in children.values():
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()

    for index in range(args.processes):
        spawn(index)
    ready: set[int] = set()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while len(ready) < args.processes:
        if not receiver.poll(max(0.0, deadline - time.monotonic())):
            stop_all()
            print(f"error: {args.processes - len(ready)} worker processes did not start within "
                  f"{STARTUP_TIMEOUT_SECONDS:.0f} s", file=sys.stderr, flush=True)
            return 1
        kind, index, detail = receiver.recv()
        if kind == "error":
            stop_all()
            print(f"error: worker process {index}: {detail}", file=sys.stderr, flush=True)
            return 1
        ready.add(index)

    stop_requested = threading.Event()

    def request_stop(reason: str) -> None:
        if not stop_requested.is_set():
            log.info("shutting down %d worker processes (%s)", len(children), reason)
            stop_requested.set()

    install_stop_triggers(request_stop, args.exit_on_stdin_eof)
    announce_ready(Endpoint.tcp(args.host, port), ready_nonce)
    while not stop_requested.wait(0.5):
        while receiver.poll():
            receiver.recv()  # readiness of restarted children
        for index, child in list(children.items()):
            if not child.is_alive() and not stop_requested.is_set():
                attempt = restarts.get(index, 0)
                restarts[index] = attempt + 1
                backoff = RESTART_BACKOFF_SECONDS[min(attempt, len(RESTART_BACKOFF_SECONDS) - 1)]
                log.warning("worker process %d (pid %s) exited with %s; restarting in %.1f s", index, child.pid,
                            child.exitcode, backoff)
                if stop_requested.wait(backoff):
                    break
                spawn(index)
    stop_all()
    reservation.close()
    log.info("stopped")
    return 0
