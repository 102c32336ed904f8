"""What TLS and mTLS (--tls-cert/--tls-key/--tls-client-ca) cost a caller, against plaintext, on both
transports, side by side in one run.

    python3 bench/tls_overhead.py                       # 5 rounds of 300 sequential calls, 10 connects
    python3 bench/tls_overhead.py --rounds 3 --calls 100

Six threaded servers (grpcio and grpclib, each plaintext, TLS, mTLS) on 127.0.0.1, a throwaway PKI
made with openssl (EC P-256, as tests/servers.make_test_pki). Each round runs every server once, in
turn, so all see the same machine: `calls` sequential `add` calls on one open BridgeClient (the
steady state: TLS is only record encryption then), then `connects` new clients' first call (TCP
connect + TLS handshake + the call). The table shows medians over the rounds and each row against
plaintext on the same transport, and the load average before and after.

Not measured: many calls at once, large messages (AES-GCM throughput is the OpenSSL's), the Elixir
channel over TLS, hosts other than loopback.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import WorkerServer, make_test_pki  # noqa: E402

TRANSPORTS = ("grpcio", "grpclib")
SECURITY = ("plaintext", "TLS", "mTLS")


def client_options(pki, security: str) -> dict:
    if security == "plaintext":
        return {}
    if security == "TLS":
        return {"tls_ca": pki.ca}
    return {"tls_ca": pki.ca, "tls_cert": pki.client, "tls_key": pki.client_key}


def server_flags(pki, security: str) -> list[str]:
    return [] if security == "plaintext" else pki.server_flags(mtls=security == "mTLS")


def sequential_ms(server: WorkerServer, options: dict, calls: int) -> float:
    from snakepit_bridge.client import BridgeClient

    with BridgeClient(server.address, **options) as client:
        client.execute("add", {"a": 1, "b": 2})  # connected before the clock starts
        start = time.perf_counter()
        for _ in range(calls):
            client.execute("add", {"a": 1, "b": 2})
        return (time.perf_counter() - start) * 1000 / calls


def connect_ms(server: WorkerServer, options: dict, connects: int) -> float:
    from snakepit_bridge.client import BridgeClient

    times = []
    for _ in range(connects):
        start = time.perf_counter()
        with BridgeClient(server.address, **options) as client:
            client.execute("add", {"a": 1, "b": 2})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--connects", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        pki = make_test_pki(Path(directory))
        servers = {}
        try:
            for transport in TRANSPORTS:
                for security in SECURITY:
                    servers[transport, security] = WorkerServer(
                        "threaded", "--transport", transport, *server_flags(pki, security)).start()
            results: dict = {key: ([], []) for key in servers}
            for _ in range(args.rounds):
                for (transport, security), server in servers.items():
                    options = client_options(pki, security)
                    results[transport, security][0].append(sequential_ms(server, options, args.calls))
                    results[transport, security][1].append(connect_ms(server, options, args.connects))
        finally:
            for server in servers.values():
                server.__exit__(None, None, None)
    load_after = os.getloadavg()
    print(f"{args.rounds} rounds; {args.calls} sequential calls and {args.connects} connects per server per round; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)\n")
    print("| transport | security | per call, open channel (ms, median) | vs plaintext | "
          "connect + first call (ms, median) | vs plaintext |")
    print("|---|---|---|---|---|---|")
    for transport in TRANSPORTS:
        plain_call = statistics.median(results[transport, "plaintext"][0])
        plain_connect = statistics.median(results[transport, "plaintext"][1])
        for security in SECURITY:
            call = statistics.median(results[transport, security][0])
            connect = statistics.median(results[transport, security][1])
            print(f"| {transport} | {security} | {call:.3f} | {call / plain_call:.2f} | {connect:.2f} | "
                  f"{connect / plain_connect:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
