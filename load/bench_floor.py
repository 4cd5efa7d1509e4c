"""The design's floor on this machine: its dispatch steps built from the same libraries with
none of QueueMaster's code, timed the way bench_dispatch.py times QueueMaster.

    .venv/bin/python load/bench_floor.py [--tasks 3000] [--rounds 3] [--json out.json]

A private RabbitMQ in a temporary directory (or --broker-url; the floor's two queues are
deleted there at the end) and two child processes:
- a floor server: a grpc.aio server whose `Submit` commits one row to a WAL-mode SQLite file
  on a writer thread, publishes the task as a persistent message into a quorum queue with
  pika's AsyncioConnection and answers once RabbitMQ confirms it; whose `Results` stream
  sends each outcome's id; and whose event consumer commits each outcome to SQLite, sends
  it on the stream and then acks it (the design's "OK only after the confirm" and "the
  outcome is stored before its event is acked");
- a floor worker: one asyncio process whose pika consumer evaluates the task's arithmetic
  inline (no pool, no child process, no timeout, no memory watch), publishes the outcome
  into a quorum events queue and acks the task once that publish is confirmed (the
  design's "ack only after the outcome is confirmed").
Everything QueueMaster adds (protobuf messages, ids, idempotency, states, metrics, a pool of
children, prefetch tuning) is left out, so these numbers are a lower bound for QueueMaster's
on the same box. Per round: sequential submits with the worker running (p50/p99 and end to
end tasks/s, the last outcome on the stream) and sequential round trips (submit, then the
outcome on the stream), with each process's CPU per task. Prints medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, Callable

import grpc
import pika
from pika.adapters.asyncio_connection import AsyncioConnection

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_dispatch import own_cpu_meter, percentile, tree_cpu_meter  # noqa: E402  (load/ is the script's directory)

from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import delete_queues  # noqa: E402

QUEUE_PREFIX = "bench.floor"  # its queues: PREFIX.tasks and PREFIX.events
SUBMIT_METHOD = "/bench.Floor/Submit"
RESULTS_METHOD = "/bench.Floor/Results"
WORKER_PREFETCH = 8
WARM_TASKS = 300
WAIT_BOUND_S = 120.0  # the most one submit may take, and the results stream's slack
TASK_BOUND_S = 0.05  # the results stream's time per task of the run, about 15 times the floor's


def floor_queues(prefix: str) -> tuple[str, str]:
    """The floor's task queue and events queue."""
    return f"{prefix}.tasks", f"{prefix}.events"


class FloorChannel:
    """One pika AsyncioConnection and a confirm-mode channel with the two quorum queues declared."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prefix: str) -> None:
        self.loop = loop
        self.task_queue, self.event_queue = floor_queues(prefix)
        self.channel: Any = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._published = 0
        self._handlers: set[asyncio.Task] = set()  # one per delivery, kept until done

    def _waiter(self) -> tuple[asyncio.Future, Callable[..., None]]:
        future = self.loop.create_future()
        return future, lambda *args: future.done() or future.set_result(args[-1] if args else None)

    async def open(self, broker_url: str) -> None:
        opened, on_open = self._waiter()
        AsyncioConnection(
            pika.URLParameters(broker_url),
            on_open_callback=on_open,
            on_open_error_callback=lambda _c, error: opened.set_exception(RuntimeError(error)),
            custom_ioloop=self.loop,
        )
        connection = await opened
        channel_opened, on_channel = self._waiter()
        connection.channel(on_open_callback=on_channel)
        self.channel = await channel_opened
        for queue in (self.task_queue, self.event_queue):
            declared, on_declared = self._waiter()
            self.channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"}, callback=on_declared)
            await declared
        selected, on_selected = self._waiter()
        self.channel.confirm_delivery(self._on_confirm, callback=on_selected)
        await selected

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        last = method.delivery_tag
        tags = [tag for tag in self._waiting if tag <= last] if method.multiple else [last]
        for tag in tags:
            self._waiting.pop(tag).set_result(isinstance(method, pika.spec.Basic.Ack))

    async def publish(self, queue: str, body: bytes) -> None:
        """Publish a persistent message and wait for RabbitMQ's confirm."""
        self._published += 1
        confirmed = self._waiting[self._published] = self.loop.create_future()
        self.channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
        if not await confirmed:
            raise RuntimeError("RabbitMQ refused a message")

    def consume(self, queue: str, prefetch: int, on_message: Callable[[int, bytes], Any]) -> None:
        """Deliveries to on_message(delivery_tag, body), each in its own asyncio task."""

        def on_delivery(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
            handler = self.loop.create_task(on_message(method.delivery_tag, body))
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)

        self.channel.basic_qos(prefetch_count=prefetch)
        self.channel.basic_consume(queue, on_delivery)


class FloorStore:
    """A WAL-mode SQLite file written by one thread, one transaction per write."""

    def __init__(self, path: str) -> None:
        self._writer = concurrent.futures.ThreadPoolExecutor(1)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, payload BLOB, outcome BLOB)")

    def _write(self, sql: str, values: tuple) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(sql, values)
        self._db.execute("COMMIT")

    async def write(self, sql: str, values: tuple) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._write, sql, values)


def serve_floor(ports: multiprocessing.Queue, broker_url: str, store_path: str | None, prefix: str) -> None:
    """The floor server (see the module's docstring); without `store_path`, no SQLite at all."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        broker = FloorChannel(loop, prefix)
        await broker.open(broker_url)
        store = FloorStore(store_path) if store_path else None
        followers: list[asyncio.Queue] = []

        async def submit(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            task_id = uuid.uuid4().hex.encode()
            if store is not None:
                await store.write("INSERT INTO tasks (id, payload) VALUES (?, ?)", (task_id, request))
            await broker.publish(broker.task_queue, task_id + b" " + request)
            return task_id

        async def results(request: bytes, context: grpc.aio.ServicerContext):
            follower: asyncio.Queue = asyncio.Queue()
            followers.append(follower)
            yield b""  # following: the client waits for this before it submits
            try:
                while True:
                    yield await follower.get()
            finally:
                followers.remove(follower)

        async def on_event(delivery_tag: int, body: bytes) -> None:
            task_id, outcome = body.split(b" ", 1)
            if store is not None:
                await store.write("UPDATE tasks SET outcome = ? WHERE id = ?", (outcome, task_id))
            for follower in followers:
                follower.put_nowait(task_id)
            broker.channel.basic_ack(delivery_tag)

        broker.consume(broker.event_queue, 100, on_event)
        handler = grpc.method_handlers_generic_handler(
            "bench.Floor",
            {
                "Submit": grpc.unary_unary_rpc_method_handler(submit),
                "Results": grpc.unary_stream_rpc_method_handler(results),
            },
        )
        await serve_on_loopback(ports, handler)

    asyncio.run(main())


async def serve_on_loopback(ports: multiprocessing.Queue, handler: grpc.GenericRpcHandler) -> None:
    """Serve `handler` with grpc.aio on a free loopback port, put the port on `ports`, and serve
    until the process is killed."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    await server.wait_for_termination()


def run_floor_worker(ready: multiprocessing.Queue, broker_url: str, prefix: str) -> None:
    """The floor worker (see the module's docstring)."""

    async def main() -> None:
        broker = FloorChannel(asyncio.get_running_loop(), prefix)
        await broker.open(broker_url)

        async def on_task(delivery_tag: int, body: bytes) -> None:
            task_id, expression = body.split(b" ", 1)
            tree = ast.parse(expression.decode(), mode="eval").body
            outcome = str(tree.left.value + tree.right.value).encode()  # the benchmark's "1 + 2"
            await broker.publish(broker.event_queue, task_id + b" " + outcome)
            broker.channel.basic_ack(delivery_tag)

        broker.consume(broker.task_queue, WORKER_PREFETCH, on_task)
        ready.put(True)
        await asyncio.Event().wait()

    asyncio.run(main())


class FloorClient:
    """A blocking gRPC client of the floor server with one open results stream, which ends
    the run with DEADLINE_EXCEEDED after `bound_s` (a lost outcome ends it there)."""

    def __init__(self, port: int, bound_s: float) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._submit = self._channel.unary_unary(SUBMIT_METHOD)
        self._stream = self._channel.unary_stream(RESULTS_METHOD)(b"", timeout=bound_s)
        next(self._stream)  # the server follows outcomes from here on

    def submit(self) -> bytes:
        return self._submit(b"1 + 2", timeout=WAIT_BOUND_S)

    def next_outcome(self) -> bytes:
        return next(self._stream)

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()


def meters(server: int, worker: int, rabbitmq: int | None) -> dict[str, Callable[[], float]]:
    """CPU meters of the client (this process), the floor's server and worker (each one process,
    thread by thread), and RabbitMQ (its process tree; none for a node given by URL)."""
    started = {"client": own_cpu_meter(os.getpid()), "server": own_cpu_meter(server), "worker": own_cpu_meter(worker)}
    if rabbitmq is not None:
        started["rabbitmq"] = tree_cpu_meter(rabbitmq)
    return started


def cpu_per_task_ms(started: dict[str, Callable[[], float]], tasks: int) -> dict[str, float]:
    per_task = {f"{name}_cpu_ms": used() / tasks * 1e3 for name, used in started.items()}
    return {**per_task, "all_cpu_ms": sum(per_task.values())}


def sequential(client: FloorClient, tasks: int, pids: tuple[int, int, int | None]) -> dict[str, float]:
    """`tasks` sequential submits with the worker running them; then every outcome."""
    started = meters(*pids)
    began = time.perf_counter()
    latencies_ms, ids = [], set()
    for _ in range(tasks):
        sent = time.perf_counter()
        ids.add(client.submit())
        latencies_ms.append((time.perf_counter() - sent) * 1e3)
    while ids:
        ids.discard(client.next_outcome())
    took_s = time.perf_counter() - began
    return {
        "submit_p50_ms": percentile(latencies_ms, 50),
        "submit_p99_ms": percentile(latencies_ms, 99),
        "e2e_tasks_per_s": tasks / took_s,
        **cpu_per_task_ms(started, tasks),
    }


def round_trips(client: FloorClient, tasks: int) -> dict[str, float]:
    """`tasks` sequential round trips: submit, then wait for that task's outcome on the stream."""
    latencies_ms = []
    for _ in range(tasks):
        sent = time.perf_counter()
        task_id = client.submit()
        while client.next_outcome() != task_id:
            pass
        latencies_ms.append((time.perf_counter() - sent) * 1e3)
    return {"round_trip_p50_ms": percentile(latencies_ms, 50), "round_trip_p99_ms": percentile(latencies_ms, 99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000, help="sequential tasks per measure and round (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--queue-prefix", default=QUEUE_PREFIX, help="name its two queues PREFIX.tasks, PREFIX.events")
    parser.add_argument("--json", type=pathlib.Path, help="also write every round's numbers as JSON here")
    args = parser.parse_args()
    if args.tasks < 1 or args.rounds < 1:
        parser.error("--tasks and --rounds must be at least 1")
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="qm-bench-floor-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = None if args.broker_url else LocalRabbitMQ(base / "rabbitmq")
        broker_url = args.broker_url or rabbitmq.start()
        spawn = multiprocessing.get_context("spawn")
        ports, ready = spawn.Queue(), spawn.Queue()
        store_path = str(base / "floor.sqlite3")
        server = spawn.Process(target=serve_floor, args=(ports, broker_url, store_path, args.queue_prefix), daemon=True)
        worker = spawn.Process(target=run_floor_worker, args=(ready, broker_url, args.queue_prefix), daemon=True)
        client = None
        try:
            server.start()
            port = ports.get(timeout=60)
            worker.start()
            ready.get(timeout=60)
            tasks_in_all = WARM_TASKS + 2 * args.tasks * args.rounds
            client = FloorClient(port, bound_s=WAIT_BOUND_S + tasks_in_all * TASK_BOUND_S)
            broker_pid = rabbitmq.process.pid if rabbitmq is not None and rabbitmq.process is not None else None
            pids = (server.pid, worker.pid, broker_pid)
            round_trips(client, WARM_TASKS)
            for number in range(args.rounds):
                rounds.append({**sequential(client, args.tasks, pids), **round_trips(client, args.tasks)})
                print(f"round {number + 1} of {args.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            if client is not None:
                client.close()
            for process in (worker, server):
                if process.is_alive():
                    process.kill()
                    process.join()
            if rabbitmq is not None:
                rabbitmq.stop()
            else:
                delete_queues(broker_url, list(floor_queues(args.queue_prefix)))
    print(f"\nthe floor: medians over {args.rounds} rounds of {args.tasks} sequential tasks")
    for key in rounds[0]:
        values = [one[key] for one in rounds]
        print(f"  {key:<22} {statistics.median(values):9.2f}   [{min(values):.2f} to {max(values):.2f}]")
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
