"""Where one qm-server's CPU goes per sequential submit, thread by thread, next to gRPC's floor.

    .venv/bin/python load/bench_server_threads.py [--submits 3000] [--rounds 3] [--json out.json]

A private RabbitMQ in a temporary directory (or --broker-url) and one qm-server (SQLite store,
default config), no worker; one client thread submits `math "1 + 2"` one at a time. Per round:
the submit latency p50 and, from /proc/PID/task/*/schedstat before and after, each server
thread's CPU µs per submit, grouped by the name the kernel shows (the event loop is the main
thread; the store's threads name themselves, qm/os_thread_names.py; gRPC's C threads show as
`event_engine`, its poller keeps the process's name). Then the same for a bare grpc.aio
server in a child process with one unary echo method and no work: gRPC's own cost per call.
Prints the medians over the rounds; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Callable

import grpc

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_dispatch import thread_cpu_ns  # noqa: E402  (load/ is the script's directory)

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import clean_env, start_server  # noqa: E402

WARM_CALLS = 300
ECHO_METHOD = "/bench.Echo/Echo"


def thread_name(pid: int, tid: int) -> str:
    """The name the kernel shows for a thread; the main thread is named `event loop`."""
    if tid == pid:
        return "event loop"
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as comm:
            return comm.read().strip()
    except OSError:  # the thread ended meanwhile
        return "ended"


def measure(pid: int, call: Callable[[], object], calls: int) -> dict[str, float]:
    """Latency p50 ms and CPU µs per call by thread name (and in all) of `calls` calls."""
    before = thread_cpu_ns(pid)
    latencies_s = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        latencies_s.append(time.perf_counter() - started)
    after = thread_cpu_ns(pid)
    if before is None or after is None:
        raise SystemExit("this kernel has no /proc/PID/task/TID/schedstat: no per-thread CPU")
    by_name: dict[str, float] = collections.defaultdict(float)
    for tid, ns in after.items():
        by_name[thread_name(pid, tid)] += (ns - before.get(tid, 0)) / calls / 1e3
    return {
        "p50_ms": 1e3 * statistics.median(latencies_s),
        "all_us": sum(by_name.values()),
        **{f"{name}_us": us for name, us in by_name.items()},
    }


def serve_echo(ports: multiprocessing.Queue) -> None:
    """A grpc.aio server with one unary method that returns its request."""

    async def main() -> None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for one in rounds for key in one})
    return {key: statistics.median(one.get(key, 0.0) for one in rounds) for key in keys}


def show(title: str, summary: dict[str, float]) -> None:
    print(f"{title}: p50 {summary['p50_ms']:.2f} ms, server CPU {summary['all_us']:.0f} µs per call")
    for key, value in sorted(summary.items(), key=lambda item: -item[1]):
        if key.endswith("_us") and key != "all_us" and value >= 1:
            print(f"  {key[:-3]:<16} {value:7.1f} µs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=3000, help="sequential calls per round (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--json", type=pathlib.Path, help="also write every round's numbers as JSON here")
    args = parser.parse_args()
    if args.submits < 1 or args.rounds < 1:
        parser.error("--submits and --rounds must be at least 1")
    report: dict[str, list[dict[str, float]]] = {"submit": [], "grpc_echo": []}
    with tempfile.TemporaryDirectory(prefix="qm-bench-server-threads-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = None if args.broker_url else LocalRabbitMQ(base / "rabbitmq")
        broker_url = args.broker_url or rabbitmq.start()
        ports: multiprocessing.Queue = multiprocessing.Queue()
        echo = multiprocessing.Process(target=serve_echo, args=(ports,), daemon=True)
        server = client = channel = None
        try:
            (base / "server").mkdir()
            server = start_server(broker_url, base / "server", env=clean_env({}))
            client = qm.Client(server=server.address)
            echo.start()
            channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}")
            call = channel.unary_unary(ECHO_METHOD)
            for _ in range(WARM_CALLS):
                client.submit("math", "1 + 2")
                call(b"x" * 64)
            for number in range(args.rounds):
                report["submit"].append(measure(server.pid, lambda: client.submit("math", "1 + 2"), args.submits))
                report["grpc_echo"].append(measure(echo.pid, lambda: call(b"x" * 64), args.submits))
                print(f"round {number + 1} of {args.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            if channel is not None:
                channel.close()
            if client is not None:
                client.close()
            if echo.is_alive():
                echo.kill()
                echo.join()
            if server is not None:
                server.stop()
            if rabbitmq is not None:
                rabbitmq.stop()
    print(f"\nmedians over {args.rounds} rounds of {args.submits} sequential calls")
    show("qm-server, SubmitTask of math '1 + 2'", medians(report["submit"]))
    show("bare grpc.aio echo server", medians(report["grpc_echo"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
