"""What locking the doors costs a call: the same trivial unary RPC through a grpc.aio
server without security, with the token interceptor, with TLS, TLS + token, and mTLS with
a certificate role.

    .venv/bin/python load/bench_auth.py                      # 5 rounds of 2,000 calls per mode
    .venv/bin/python load/bench_auth.py --calls 500 --rounds 2

The server runs in its own process (qm.server.auth.AuthInterceptor and
qm.security.tls.ServerTLS, exactly as qm-server wires them, with a tokens file of 20
tokens); the client is one blocking channel (qm.client.credentials.ChannelSecurity)
making calls one after another, so the number is the latency a call pays, not a
throughput limit. Connections are made before timing (a TLS handshake is paid once per
channel, not per call). Modes are interleaved round by round, so the noise of a shared
machine falls on all alike; medians are printed. Certificates come from the openssl CLI
(tests/security/support.py). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from qm.client.credentials import ChannelSecurity  # noqa: E402
from qm.security.tls import ClientTLS, ServerTLS  # noqa: E402
from qm.security.tokens import TokenFile  # noqa: E402
from qm.server import auth  # noqa: E402
from tests.security.support import make_certificates  # noqa: E402

METHOD = "/qm.v1.TaskQueue/ListTaskTypes"
MODES = ("plaintext", "token", "tls", "tls+token", "mtls cert role")


async def _serve(mode: str, tokens_path: str, certs, port_queue) -> None:
    authenticator = auth.Authenticator(tokens_path if "token" in mode else "",
                                       {"ci-runner": "read"} if mode.startswith("mtls") else {})
    authenticator.load()
    interceptors = [auth.AuthInterceptor(authenticator)] if authenticator.enabled else None
    server = grpc.aio.server(interceptors=interceptors)

    async def echo(request: bytes, context) -> bytes:
        return request

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "qm.v1.TaskQueue", {"ListTaskTypes": grpc.unary_unary_rpc_method_handler(echo)}),))
    if "tls" in mode:
        tls = ServerTLS.load(str(certs.server.cert), str(certs.server.key),
                             str(certs.ca.cert) if mode.startswith("mtls") else "", "server.")
        port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_queue.put(port)
    await server.wait_for_termination()


def _server_main(mode: str, tokens_path: str, certs, port_queue) -> None:
    asyncio.run(_serve(mode, tokens_path, certs, port_queue))


def _client(mode: str, token: str, certs) -> ChannelSecurity:
    tls = None
    if "tls" in mode:
        pair = certs.client if mode.startswith("mtls") else None
        tls = ClientTLS.load(str(certs.ca.cert), str(pair.cert) if pair else None, str(pair.key) if pair else None)
    return ChannelSecurity(tls, token if "token" in mode else "")


def _time_calls(call, calls: int) -> tuple[float, float]:
    """(calls per second, median latency in ms) of `calls` sequential calls."""
    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        begin = time.perf_counter()
        call(b"x", timeout=10)
        latencies.append(time.perf_counter() - begin)
    return calls / (time.perf_counter() - started), statistics.median(latencies) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per mode per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (modes interleaved)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        certs = make_certificates(pathlib.Path(scratch) / "certs")
        tokens = TokenFile(str(pathlib.Path(scratch) / "tokens.json"))
        token = [tokens.create("read", f"user-{n}") for n in range(20)][-1]  # the last one: a full scan
        context = multiprocessing.get_context("spawn")
        servers, channels, rates, medians = [], {}, {m: [] for m in MODES}, {m: [] for m in MODES}
        try:
            for mode in MODES:
                ports = context.Queue()
                process = context.Process(target=_server_main, args=(mode, tokens.path, certs, ports), daemon=True)
                process.start()
                servers.append(process)
                channel = _client(mode, token, certs).channel(f"127.0.0.1:{ports.get(timeout=60)}")
                call = channel.unary_unary(METHOD)
                call(b"warm-up", timeout=30)
                channels[mode] = (channel, call)
            for _ in range(args.rounds):
                for mode in MODES:
                    rate, median_ms = _time_calls(channels[mode][1], args.calls)
                    rates[mode].append(rate)
                    medians[mode].append(median_ms)
        finally:
            for channel, _call in channels.values():
                channel.close()
            for process in servers:
                process.kill()
                process.join(10)
    base = statistics.median(medians["plaintext"])
    print(f"{'mode':<16} {'calls/s':>9} {'p50 ms':>8} {'vs plaintext':>13}")
    for mode in MODES:
        median_ms = statistics.median(medians[mode])
        print(f"{mode:<16} {statistics.median(rates[mode]):>9.0f} {median_ms:>8.3f} {median_ms - base:>+12.3f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
