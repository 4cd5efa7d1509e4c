"""Where one qm-server's CPU goes per sequential submit, thread by thread, next to gRPC's floor.

    .venv/bin/python load/bench_server_threads.py [--submits 3000] [--rounds 3] [--worker] [--json out.json]

A private RabbitMQ in a temporary directory (or --broker-url) and one qm-server (SQLite store,
default config), no worker; one client thread submits `math "1 + 2"` one at a time. Per round:
the submit latency p50 and, from /proc/PID/task/*/schedstat before and after, each server
thread's CPU µs per submit, grouped by the name the kernel shows (the event loop is the main
thread; the store's threads name themselves, qm/os_thread_names.py; gRPC's C threads show as
`event_engine`, its poller keeps the process's name). Then the same for a bare grpc.aio
server in a child process with one unary echo method and no work: gRPC's own cost per call;
and for bench_floor.py's floor servers (no QueueMaster code): grpc.aio plus a confirmed
publish into a quorum queue, and the same with one SQLite WAL commit ahead of the publish.
With --worker, a `qm-worker --procs 2` runs the tasks too, and every round measures the
submits twice instead of once without a worker: with the worker running them, and with the
worker's processes stopped (SIGSTOP; the tasks wait in the queue, then run): what running
the tasks at the same time adds to a sequential submit, with the supervisor's, its
children's and RabbitMQ's CPU (the heartbeat: keep a round well under a minute).
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
import urllib.parse
from typing import Callable

import grpc
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_dispatch import (  # noqa: E402  (load/ is the script's directory)
    listener_pid,
    percentile,
    thread_cpu_ns,
    worker_and_broker_meters,
)
from bench_floor import SUBMIT_METHOD, floor_queues, serve_floor, serve_on_loopback  # noqa: E402

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import band_queues, clean_env, delete_queues, start_server, start_worker  # noqa: E402

WARM_CALLS = 300
DRAIN_BOUND_S = 300.0  # the most the worker may take to finish a round's tasks
ECHO_METHOD = "/bench.Echo/Echo"
BARE_TITLES = {
    "grpc_echo": "bare grpc.aio echo server",
    "floor_publish": "grpc.aio + pika confirmed publish into a quorum queue (no QueueMaster code)",
    "floor_store_publish": "grpc.aio + one SQLite WAL commit + pika confirmed publish (no QueueMaster code)",
}


def thread_name(pid: int, tid: int) -> str:
    """The name the kernel shows for a thread; the main thread is named `event loop`."""
    if tid == pid:
        return "event loop"
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as comm:
            return comm.read().strip()
    except OSError:  # the thread ended meanwhile
        return "ended"


def measure(
    pid: int,
    call: Callable[[], object],
    calls: int,
    processes: dict[str, Callable[[], Callable[[], float]]] | None = None,
) -> tuple[dict[str, float], list[object]]:
    """Latency p50/p99 ms and CPU µs per call by thread name (and in all) of `calls` calls;
    `processes`: more processes to meter (name: what starts a meter of its CPU seconds).
    Returns the numbers and what the calls returned."""
    meters = {name: start() for name, start in (processes or {}).items()}
    before = thread_cpu_ns(pid)
    latencies_ms, returned = [], []
    for _ in range(calls):
        started = time.perf_counter()
        returned.append(call())
        latencies_ms.append((time.perf_counter() - started) * 1e3)
    after = thread_cpu_ns(pid)
    if before is None or after is None:
        raise SystemExit("this kernel has no /proc/PID/task/TID/schedstat: no per-thread CPU")
    by_name: dict[str, float] = collections.defaultdict(float)
    for tid, ns in after.items():
        by_name[thread_name(pid, tid)] += (ns - before.get(tid, 0)) / calls / 1e3
    others = {f"{name} (process)_us": used() / calls * 1e6 for name, used in meters.items()}
    return {
        "p50_ms": percentile(latencies_ms, 50) or 0.0,
        "p99_ms": percentile(latencies_ms, 99) or 0.0,
        "all_us": sum(by_name.values()),
        **{f"{name}_us": us for name, us in by_name.items()},
        **others,
    }, returned


def worker_processes(pid: int) -> list[psutil.Process]:
    """The worker's supervisor and every process under it."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def serve_echo(ports: multiprocessing.Queue) -> None:
    """A grpc.aio server with one unary method that returns its request."""

    async def main() -> None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        await serve_on_loopback(ports, handler)

    asyncio.run(main())


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({key for one in rounds for key in one})
    return {key: statistics.median(one.get(key, 0.0) for one in rounds) for key in keys}


def show(title: str, summary: dict[str, float]) -> None:
    print(
        f"{title}: p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, "
        f"server CPU {summary['all_us']:.0f} µs per call"
    )
    for key, value in sorted(summary.items(), key=lambda item: -item[1]):
        if key.endswith("_us") and key != "all_us" and value >= 1:
            print(f"  {key[:-3]:<16} {value:7.1f} µs")


def with_worker_rounds(
    report: dict[str, list[dict[str, float]]],
    submit: Callable[[], str],
    client: qm.Client,
    server_pid: int,
    worker_pid: int,
    broker_pid: int | None,
    submits: int,
) -> None:
    """One round of submits with the worker running the tasks, one with it stopped; each
    round's tasks all finish before the next starts."""
    meters = worker_and_broker_meters(worker_pid, broker_pid)
    numbers, ids = measure(server_pid, submit, submits, meters)
    report["submit_worker_running"].append(numbers)
    list(client.results([str(i) for i in ids], timeout_s=DRAIN_BOUND_S))
    stopped = worker_processes(worker_pid)
    for process in stopped:
        process.suspend()
    try:
        numbers, ids = measure(server_pid, submit, submits, {"rabbitmq": meters["rabbitmq"]})
    finally:
        for process in stopped:
            process.resume()
    report["submit_worker_stopped"].append(numbers)
    list(client.results([str(i) for i in ids], timeout_s=DRAIN_BOUND_S))


BareServers = dict[str, tuple[multiprocessing.Process, int, str]]  # name -> (process, port, its method)


def start_bare_servers(broker_url: str, base: pathlib.Path, prefix: str) -> BareServers:
    """The servers built without QueueMaster's code (bench_floor.py's for the floors), each in a
    child process: name -> (process, port, the method to call)."""
    plans = {
        "grpc_echo": (serve_echo, (), ECHO_METHOD),
        "floor_publish": (serve_floor, (broker_url, None, prefix), SUBMIT_METHOD),
        "floor_store_publish": (serve_floor, (broker_url, str(base / "floor.sqlite3"), prefix), SUBMIT_METHOD),
    }
    spawn = multiprocessing.get_context("spawn")
    started: BareServers = {}
    for name, (target, args, method) in plans.items():
        ports: multiprocessing.Queue = spawn.Queue()
        process = spawn.Process(target=target, args=(ports, *args), daemon=True)
        process.start()
        started[name] = (process, ports.get(timeout=60), method)
    return started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=3000, help="sequential calls per round (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument(
        "--worker",
        action="store_true",
        help="also run the tasks on a qm-worker --procs 2: submits with it running and stopped",
    )
    parser.add_argument("--queue", default="default", help="logical queue for the tasks (default)")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--json", type=pathlib.Path, help="also write every round's numbers as JSON here")
    args = parser.parse_args()
    if args.submits < 1 or args.rounds < 1:
        parser.error("--submits and --rounds must be at least 1")
    report: dict[str, list[dict[str, float]]] = {"submit": [], **{name: [] for name in BARE_TITLES}}
    if args.worker:
        report.update(submit_worker_running=[], submit_worker_stopped=[])
    with tempfile.TemporaryDirectory(prefix="qm-bench-server-threads-") as tmp:
        base = pathlib.Path(tmp)
        floor_prefix = f"bench.floor.{os.getpid()}"  # the floor servers' two queues
        rabbitmq = None if args.broker_url else LocalRabbitMQ(base / "rabbitmq")
        broker_url = args.broker_url or rabbitmq.start()
        if rabbitmq is not None:
            broker_pid = rabbitmq.process.pid if rabbitmq.process else None
        else:
            broker_pid = listener_pid(urllib.parse.urlsplit(broker_url).port or 5672)
        server = worker = client = None
        bare: BareServers = {}
        channels: list[grpc.Channel] = []
        try:
            (base / "server").mkdir()
            server = start_server(broker_url, base / "server", env=clean_env({}))
            client = qm.Client(server=server.address)
            bare = start_bare_servers(broker_url, base, floor_prefix)
            calls = {}
            for name, (_process, port, path) in bare.items():
                channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
                method = channels[-1].unary_unary(path)
                calls[name] = lambda method=method: method(b"1 + 2")
            submit = lambda: client.submit("math", "1 + 2", queue=args.queue)  # noqa: E731
            warm_ids = []
            for _ in range(WARM_CALLS):
                warm_ids.append(submit())
                for call in calls.values():
                    call()
            if args.worker:
                worker = start_worker(broker_url, procs=2, queues=args.queue)
                list(client.results(warm_ids, timeout_s=DRAIN_BOUND_S))
            for number in range(args.rounds):
                if worker is None:  # with a worker, tasks left in the queue would run during the next measure
                    report["submit"].append(measure(server.pid, submit, args.submits)[0])
                for name, call in calls.items():
                    report[name].append(measure(bare[name][0].pid, call, args.submits)[0])
                if worker is not None:
                    with_worker_rounds(report, submit, client, server.pid, worker.pid, broker_pid, args.submits)
                print(f"round {number + 1} of {args.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for channel in channels:
                channel.close()
            if client is not None:
                client.close()
            for process, _port, _path in bare.values():
                if process.is_alive():
                    process.kill()
                    process.join()
            for process in (worker, server):
                if process is not None:
                    process.stop()
            if rabbitmq is not None:
                rabbitmq.stop()
            elif server is not None:  # a shared node: leave no queue of ours behind
                extra = band_queues(args.queue) if args.queue != "default" else []
                delete_queues(broker_url, [f"qm.events.{server.server_id}", *floor_queues(floor_prefix), *extra])
    print(f"\nmedians over {args.rounds} rounds of {args.submits} sequential calls")
    if report["submit"]:
        show("qm-server, SubmitTask of math '1 + 2', no worker", medians(report["submit"]))
    if args.worker:
        running, stopped = medians(report["submit_worker_running"]), medians(report["submit_worker_stopped"])
        show("qm-server, SubmitTask with qm-worker --procs 2 running the tasks", running)
        show("qm-server, SubmitTask with the worker's processes stopped", stopped)
    for name, title in BARE_TITLES.items():
        show(title, medians(report[name]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
