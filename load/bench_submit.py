"""Submission benchmark: one task per SubmitTask call versus SubmitTasks batches.

    .venv/bin/python load/bench_submit.py            # ~1 minute
    .venv/bin/python load/bench_submit.py --tasks 5000 --json out.json

Starts a private RabbitMQ node and one qm-server on loopback (tests/processes.py), no
worker (submission only: every task is stored and confirmed by RabbitMQ before its id
comes back), and times N `math` tasks submitted by: qm.Client.submit one after the other;
qm.Client.submit_many (SubmitTasks calls of 500); qm.aio.Client.submit, all at once with
asyncio.gather; qm.aio.Client.submit_many. Prints tasks per second; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
import qm.aio  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import start_server, unique  # noqa: E402


def items(count: int) -> list[tuple[str, str]]:
    return [("math", f"{i} + 1") for i in range(count)]


def one_by_one(address: str, queue: str, count: int) -> None:
    with qm.Client(address) as client:
        for task_type, payload in items(count):
            client.submit(task_type, payload, queue=queue)


def batched(address: str, queue: str, count: int) -> None:
    with qm.Client(address) as client:
        assert len(client.submit_many(items(count), queue=queue)) == count


def aio_gather(address: str, queue: str, count: int) -> None:
    async def run() -> None:
        async with qm.aio.Client(address) as client:
            await asyncio.gather(*(client.submit(t, p, queue=queue) for t, p in items(count)))
    asyncio.run(run())


def aio_batched(address: str, queue: str, count: int) -> None:
    async def run() -> None:
        async with qm.aio.Client(address) as client:
            assert len(await client.submit_many(items(count), queue=queue)) == count
    asyncio.run(run())


WAYS = {"submit, one after the other": one_by_one, "submit_many (batches of 500)": batched,
        "aio submit x N, gathered": aio_gather, "aio submit_many": aio_batched}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per way of submitting (default 2000)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qm-bench-submit-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = LocalRabbitMQ(base / "rabbitmq")
        url = rabbitmq.start()
        server = start_server(url, base)
        numbers = {}
        try:
            batched(server.address, unique("warm"), 10)  # connections, queue declarations
            for name, way in WAYS.items():
                started = time.perf_counter()
                way(server.address, unique("bench"), args.tasks)
                seconds = time.perf_counter() - started
                numbers[name] = {"tasks": args.tasks, "seconds": round(seconds, 3),
                                 "tasks_per_s": round(args.tasks / seconds, 1)}
                rate = args.tasks / seconds
                print(f"{name:<32} {args.tasks} tasks in {seconds:6.2f} s  {rate:8.1f} tasks/s", flush=True)
        finally:
            server.stop()
            rabbitmq.stop()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
