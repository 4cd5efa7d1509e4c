"""Scale-out benchmark: one vs two qm-servers on a shared PostgreSQL store, and the events
each server applies per task with SQLite replicas vs the shared store.

    .venv/bin/python load/bench_scale.py                  # ~2 minutes a round
    .venv/bin/python load/bench_scale.py --rounds 3       # medians of 3 interleaved rounds
    .venv/bin/python load/bench_scale.py --tasks 4000 --json out.json

Starts a private RabbitMQ node and a private PostgreSQL (qm.testing: loopback, temp
dirs), one qm-worker per scenario, and for each scenario fresh servers (tests/processes.py):

- `postgres x1`: one server on a fresh PostgreSQL database;
- `postgres x2`: two servers on one fresh database (one store; competing consumers of
  its events queue);
- `sqlite x2`: two servers with their own SQLite stores (a replica each).

N `math` tasks are submitted with qm.aio.Client.submit_many, split evenly over the
scenario's servers (one client per server, concurrently), and followed to the end
through them. Reported: end-to-end rate = N / (last finished_at - first created_at) and
submit rate = N / (time until the last share was accepted), each with its ratio to
`postgres x1`, and per server the outcome events it applied (`qm_server_events_total`
with state SUCCEEDED, from its /metrics) divided by N: every task has exactly one (a run
this short has no RUNNING event of its own: worker.running_event_delay_s). Everything runs on one box,
so the rates are a ratio on this machine, not a capacity; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm.aio  # noqa: E402
from qm.testing.postgres import LocalPostgres  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ, free_port  # noqa: E402
from tests.processes import Server, band_queues, delete_queues, start_server, start_worker, unique  # noqa: E402

#: Longest wait for a scenario's tasks to finish.
FINISH_TIMEOUT_S = 600.0
#: Longest wait for every server to have applied the events of the tasks it followed.
EVENTS_SETTLE_S = 30.0
STORE_LINE = re.compile(r"\(store id (?P<store_id>\S+),")
OUTCOMES_LINE = re.compile(r'^qm_server_events_total\{state="SUCCEEDED"\} (?P<value>[0-9.e+]+)$', re.M)


def events_applied(_server: Server, metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(match["value"]) for match in OUTCOMES_LINE.finditer(text))


async def submit_and_follow(addresses: list[str], queue: str, count: int) -> tuple[list, float]:
    """Submit `count` tasks split over the servers, follow each share through its server;
    every final status, and how long the submit phase took (the last share accepted)."""
    started = time.perf_counter()
    submitted: list[float] = []

    async def share(address: str, part: list[tuple[str, str]]) -> list:
        async with qm.aio.Client(address) as client:
            ids = await client.submit_many(part, queue=queue)
            submitted.append(time.perf_counter() - started)
            return [status async for status in client.results(ids, timeout_s=FINISH_TIMEOUT_S)]

    items = [("math", f"{i} * 2") for i in range(count)]
    shares = [items[i::len(addresses)] for i in range(len(addresses))]
    finals = await asyncio.gather(*(share(address, part) for address, part in zip(addresses, shares, strict=True)))
    return [status for part in finals for status in part], max(submitted)


def scenario(name: str, broker_url: str, store_urls: list[str | None], base: pathlib.Path, count: int,
             procs: int) -> dict:
    queue = unique("scale")
    servers: list[tuple[Server, int]] = []
    worker = start_worker(broker_url, procs=procs, queues=queue)
    try:
        for store_url in store_urls:
            metrics_port = free_port()
            extra = ["--metrics-port", str(metrics_port)] + (["--store-url", store_url] if store_url else [])
            servers.append((start_server(broker_url, base, extra_args=extra), metrics_port))
        asyncio.run(warm([s.address for s, _ in servers], queue))
        # Each warm-up task makes 1 outcome event (SUCCEEDED), applied by every SQLite
        # replica, or once by one of the servers of a shared store.
        copies = len(servers) if store_urls[0] is None else 1
        before = settled_events(servers, [0.0] * len(servers), len(servers) * copies)
        started = time.perf_counter()
        finals, submit_s = asyncio.run(submit_and_follow([s.address for s, _ in servers], queue, count))
        wall_s = time.perf_counter() - started
        after = settled_events(servers, before, count * copies)
    finally:
        for server, _port in servers:
            server.stop()
        worker.stop()
        delete_queues(broker_url, scenario_queues([server for server, _port in servers], queue))
    succeeded = sum(status.state == "SUCCEEDED" for status in finals)
    span_s = max(s.finished_at for s in finals) - min(s.created_at for s in finals)
    return {"scenario": name, "tasks": count, "succeeded": succeeded, "wall_s": round(wall_s, 2),
            "end_to_end_per_s": round(count / span_s, 1), "submit_per_s": round(count / submit_s, 1),
            "events_per_task_per_server": [round((a - b) / count, 2) for a, b in zip(after, before, strict=True)]}


def settled_events(servers: list[tuple[Server, int]], since: list[float], expected: int) -> list[float]:
    """Each server's applied-events counter, once they add up to `expected` more than
    `since` (a server's followers may have their results before another server applied
    its copy of the events), or after EVENTS_SETTLE_S."""
    deadline = time.monotonic() + EVENTS_SETTLE_S
    while True:
        counts = [events_applied(server, port) for server, port in servers]
        if sum(counts) - sum(since) >= expected or time.monotonic() >= deadline:
            return counts
        time.sleep(0.1)


def scenario_queues(servers: list[Server], queue: str) -> set[str]:
    """The durable queues a scenario left on RabbitMQ (a shared node outlives the run)."""
    names = set(band_queues(queue))
    for server in servers:
        names |= {f"qm.events.{server.server_id}", f"qm.dead.{server.server_id}", f"qm.heartbeats.{server.server_id}"}
        store = STORE_LINE.search(server.stderr)
        if store:
            names |= {f"qm.events.{store['store_id']}", f"qm.dead.{store['store_id']}"}
    return names


async def warm(addresses: list[str], queue: str) -> None:
    for address in addresses:  # connections, queue declarations, the worker's first task
        async with qm.aio.Client(address) as client:
            [task_id] = await client.submit_many([("math", "1 + 1")], queue=queue)
            async for _status in client.results([task_id], timeout_s=120.0):
                pass


def print_table(results: list[dict]) -> None:
    """Per scenario: the median over the rounds [min-max], and its ratio to postgres x1's."""
    by_name: dict[str, list[dict]] = {}
    for result in results:
        by_name.setdefault(result["scenario"], []).append(result)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in by_name[name])

    def spread(name: str, key: str) -> str:
        values = [r[key] for r in by_name[name]]
        return f"{median(name, key):.0f} [{min(values):.0f}-{max(values):.0f}]"

    print(f"\n{'scenario':<12} {'end to end/s':>18} {'ratio':>6} {'submit/s':>18} {'ratio':>6}  "
          "outcome events applied per task, per server (each round)")
    for name in by_name:
        print(f"{name:<12} {spread(name, 'end_to_end_per_s'):>18} "
              f"{median(name, 'end_to_end_per_s') / median('postgres x1', 'end_to_end_per_s'):>6.2f} "
              f"{spread(name, 'submit_per_s'):>18} "
              f"{median(name, 'submit_per_s') / median('postgres x1', 'submit_per_s'):>6.2f}  "
              f"{[r['events_per_task_per_server'] for r in by_name[name]]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per scenario (default 2000)")
    parser.add_argument("--procs", type=int, default=2, help="worker children (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of all scenarios, interleaved; medians reported (default 1)")
    parser.add_argument("--durable", action="store_true",
                        help="PostgreSQL with fsync on (default off: a killed server loses nothing, "
                             "a crashed host would)")
    parser.add_argument("--broker-url", metavar="URL",
                        help="use this RabbitMQ instead of starting one (its queues are the runs' own)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qm-bench-scale-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = None if args.broker_url else LocalRabbitMQ(base / "rabbitmq")
        broker_url = args.broker_url or rabbitmq.start()  # type: ignore[union-attr]
        postgres = LocalPostgres(base / "postgres", durable=args.durable)
        postgres.start()
        results: list[dict] = []
        try:
            for round_number in range(1, args.rounds + 1):  # interleaved: load drifts hit all alike
                plans = [("postgres x1", [postgres.create_database(f"scale_one_{round_number}")]),
                         ("postgres x2", [postgres.create_database(f"scale_two_{round_number}")] * 2),
                         ("sqlite x2", [None, None])]
                for name, store_urls in plans:
                    result = scenario(name, broker_url, store_urls, base, args.tasks, args.procs)
                    result["round"] = round_number
                    results.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            postgres.cleanup()
            if rabbitmq is not None:
                rabbitmq.stop()
    print_table(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
