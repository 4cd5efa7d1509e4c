"""Submission benchmark: one task per SubmitTask call versus SubmitTasks batches.

    .venv/bin/python load/bench_submit.py            # ~1 minute
    .venv/bin/python load/bench_submit.py --tasks 5000 --rounds 3 --json out.json
    .venv/bin/python load/bench_submit.py --server-pythonpath /tmp/old-checkout   # before/after
    .venv/bin/python load/bench_submit.py --postgres     # the server on a PostgreSQL store

Starts a private RabbitMQ node and one qm-server on loopback (tests/processes.py; with
`--postgres` on a private PostgreSQL store, else SQLite), no worker (submission only:
every task is stored and confirmed by RabbitMQ before its id comes back), and times N
`math` tasks submitted by: qm.Client.submit one after the other (also its latency
p50/p99); qm.Client.submit_many (SubmitTasks calls of 500); qm.aio.Client.submit, all at
once with asyncio.gather; qm.aio.Client.submit_many. For each: tasks per second and the
server's CPU ms per task, the median of --rounds rounds (the ways take turns). At the
end, from the server's /metrics: store transactions (how many, writes per transaction)
and the event loop's time per store call (the budget of a call on the loop is 100 us).
Asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import statistics
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "load"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_worker import cpu_seconds, percentile  # noqa: E402

import qm  # noqa: E402
import qm.aio  # noqa: E402
from qm.testing.postgres import LocalPostgres  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import clean_env, start_server, unique  # noqa: E402

#: Latencies of the last one_by_one run, seconds.
LATENCIES_S: list[float] = []


def items(count: int) -> list[tuple[str, str]]:
    return [("math", f"{i} + 1") for i in range(count)]


def one_by_one(address: str, queue: str, count: int) -> None:
    LATENCIES_S.clear()
    with qm.Client(address) as client:
        for task_type, payload in items(count):
            started = time.perf_counter()
            client.submit(task_type, payload, queue=queue)
            LATENCIES_S.append(time.perf_counter() - started)


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics as {"name{labels}": value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def store_report(samples: dict[str, float]) -> dict[str, object]:
    """Store transactions and the loop's time per store call, from the server's metrics."""
    report: dict[str, object] = {}
    count = samples.get("qm_server_store_transaction_writes_count")
    if count:
        report["transactions"] = int(count)
        report["writes_per_transaction"] = round(samples["qm_server_store_transaction_writes_sum"] / count, 1)
        report["transaction_ms_mean"] = round(1e3 * samples["qm_server_store_transaction_seconds_sum"] / count, 3)
    calls: dict[str, dict[str, float]] = {}
    for name, value in samples.items():
        if name.startswith("qm_server_store_loop_seconds_"):
            call = name.split('call="')[1].split('"')[0]
            entry = calls.setdefault(call, {})
            if name.startswith("qm_server_store_loop_seconds_count"):
                entry["calls"] = value
            elif name.startswith("qm_server_store_loop_seconds_sum"):
                entry["sum_s"] = value
            elif 'le="2.5e-05"' in name:
                entry["le_25us"] = value
            elif 'le="0.0001"' in name:
                entry["le_100us"] = value
    report["loop_calls"] = {call: {"calls": int(entry["calls"]),
                                   "mean_us": round(1e6 * entry["sum_s"] / entry["calls"], 1),
                                   "within_25us": round(entry["le_25us"] / entry["calls"], 4),
                                   "within_100us": round(entry["le_100us"] / entry["calls"], 4)}
                            for call, entry in sorted(calls.items()) if entry.get("calls")}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per way of submitting (default 2000)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; medians are reported (default 1)")
    parser.add_argument("--server-pythonpath", metavar="DIR",
                        help="run qm-server with PYTHONPATH=DIR (another checkout: before/after numbers)")
    parser.add_argument("--postgres", action="store_true",
                        help="store on a private PostgreSQL (qm.testing.postgres), not SQLite")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory(prefix="qm-bench-submit-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = LocalRabbitMQ(base / "rabbitmq")
        url = rabbitmq.start()
        postgres = LocalPostgres(base / "postgres") if args.postgres else None
        store_args: list[str] = []
        if postgres is not None:
            postgres.start()
            store_args = ["--store-url", postgres.create_database("bench_submit")]
        metrics_port = free_port()
        env = clean_env({"PYTHONPATH": args.server_pythonpath} if args.server_pythonpath else None)
        server = start_server(url, base, env=env, extra_args=["--metrics-port", str(metrics_port), *store_args])
        try:
            batched(server.address, unique("warm"), 10)  # connections, queue declarations
            for _round in range(args.rounds):
                for name, way in WAYS.items():
                    cpu0, started = cpu_seconds(server.pid), time.perf_counter()
                    way(server.address, unique("bench"), args.tasks)
                    seconds, cpu_s = time.perf_counter() - started, cpu_seconds(server.pid) - cpu0
                    run = {"tasks_per_s": args.tasks / seconds, "server_cpu_ms_per_task": 1e3 * cpu_s / args.tasks}
                    if way is one_by_one:
                        run["p50_ms"] = 1e3 * (percentile(LATENCIES_S, 50) or 0.0)
                        run["p99_ms"] = 1e3 * (percentile(LATENCIES_S, 99) or 0.0)
                    runs[name].append(run)
                    print(f"{name:<32} {args.tasks} tasks in {seconds:6.2f} s  {args.tasks / seconds:8.1f} tasks/s  "
                          f"server {run['server_cpu_ms_per_task']:.2f} CPU ms/task", flush=True)
            store = store_report(scrape(metrics_port))
        finally:
            server.stop()
            if postgres is not None:
                postgres.stop()
            rabbitmq.stop()
    numbers: dict[str, object] = {name: {key: round(statistics.median(run[key] for run in way_runs), 2)
                                         for key in way_runs[0]} for name, way_runs in runs.items()}
    print("\nmedians of", args.rounds, "round(s):")
    for name, medians in numbers.items():
        print(f"  {name:<32} " + "  ".join(f"{key} {value}" for key, value in medians.items()))
    numbers["store"] = store
    print("store:", json.dumps(store, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
