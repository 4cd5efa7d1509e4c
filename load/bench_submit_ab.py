"""Interleaved before/after of sequential submits on the server alone, on SQLite and PostgreSQL.

    git archive OLD qm | tar -x -C /tmp/before
    .venv/bin/python load/bench_submit_ab.py before=/tmp/before after=. [--tasks 1000] [--rounds 10]

One private RabbitMQ and one private PostgreSQL; per tree and store (`--stores`, default
`sqlite,pg`) one qm-server started with the tree first on PYTHONPATH, no worker, all up
at once. Each round, every server gets `--tasks` sequential qm.Client.submit calls of a
`math` task, in turns (the order flips every round), so the machine's drift falls on all
of them alike. Prints per tree and store the medians over the rounds of the submit
latency p50, the server's CPU ms per task (and PostgreSQL's, all its processes), and the
slowest call of a round (`--many N`:
`submit_many` calls of N tasks instead of single submits); with
`--gc-pauses`, also each server's full garbage collections during the rounds (how many,
the longest, their sum; recorded in the server by load/gc_pauses/sitecustomize.py); with
`--follow`, also one StreamTaskResults call following the round's tasks (still QUEUED, as
no worker runs): how long until their current statuses are all in, and the server's CPU per
followed id. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import grpc
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "load"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_dispatch import tree_cpu_s  # noqa: E402

import qm  # noqa: E402
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc  # noqa: E402
from qm.client.common import FOLLOW_IDS_PER_REQUEST  # noqa: E402
from qm.testing.postgres import LocalPostgres  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import Server, clean_env, start_server  # noqa: E402

WARM_TASKS = 100
#: What the summary shows of each round: (field, label, unit, decimals).
SHOWN = (
    ("p50_ms", "p50", "ms", 2),
    ("cpu_ms", "server", "CPU ms/task", 3),
    ("slowest_ms", "slowest call", "ms", 1),
    ("pg_cpu_ms", "PostgreSQL", "CPU ms/task", 3),
    ("follow_ms", "follow all", "ms", 0),
    ("follow_cpu_us", "server", "CPU us/followed id", 1),
)
#: Put first on a server's PYTHONPATH by --gc-pauses: records its garbage collections.
GC_RECORDER = REPO / "load" / "gc_pauses"


def server_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def one_round(
    server: Server, client: qm.Client, tasks: int, many: int = 0, follow: bool = False, pg_pid: int | None = None
) -> dict[str, float]:
    """Latency p50 ms, server CPU ms per task and slowest call ms of `tasks` sequential
    submits, or with `many`, of `tasks // many` submit_many calls of `many` tasks each (and
    PostgreSQL's CPU ms per task, given its pid); with `follow`, then the stream following
    them all (`follow_ms`, `follow_cpu_us` per id)."""
    latencies_s, ids = [], []
    cpu0 = server_cpu_s(server.pid)
    pg0 = tree_cpu_s(pg_pid) if pg_pid else 0.0
    calls, batch = (tasks // many, [("math", "1 + 2")] * many) if many else (tasks, [])
    for _ in range(calls):
        started = time.perf_counter()
        if many:
            ids += client.submit_many(batch)
        else:
            ids.append(client.submit("math", "1 + 2"))
        latencies_s.append(time.perf_counter() - started)
    cpu_ms = 1e3 * (server_cpu_s(server.pid) - cpu0) / (calls * (many or 1))
    run = {"p50_ms": 1e3 * statistics.median(latencies_s), "cpu_ms": cpu_ms, "slowest_ms": 1e3 * max(latencies_s)}
    if pg_pid:
        run["pg_cpu_ms"] = 1e3 * (tree_cpu_s(pg_pid) - pg0) / (calls * (many or 1))
    if follow:
        cpu0, started = server_cpu_s(server.pid), time.perf_counter()
        follow_current(server.address, ids)
        run["follow_ms"] = 1e3 * (time.perf_counter() - started)
        run["follow_cpu_us"] = 1e6 * (server_cpu_s(server.pid) - cpu0) / len(ids)
    return run


def follow_current(address: str, ids: list[str]) -> None:
    """Follow `ids` on one stream (in requests of the client's size) until a status of each
    came back, then hang up."""
    requests = [
        task_queue_pb2.StreamTaskResultsRequest(task_ids=ids[start : start + FOLLOW_IDS_PER_REQUEST], batched=True)
        for start in range(0, len(ids), FOLLOW_IDS_PER_REQUEST)
    ]
    with grpc.insecure_channel(address) as channel:
        stream = task_queue_pb2_grpc.TaskQueueStub(channel).StreamTaskResults(iter(requests), timeout=120)
        seen: set[str] = set()
        for response in stream:
            seen.update(status.task_id for status in response.statuses)
            if len(seen) == len(ids):
                stream.cancel()
                return
    raise RuntimeError(f"the stream ended with {len(seen)} of {len(ids)} statuses")


def server_env(tree: pathlib.Path, gc_dir: pathlib.Path | None) -> dict[str, str]:
    """The server's PYTHONPATH (the tree first) and, with `gc_dir`, the GC recorder."""
    if gc_dir is None:
        return {"PYTHONPATH": str(tree.resolve())}
    gc_dir.mkdir()
    return {"PYTHONPATH": f"{GC_RECORDER}:{tree.resolve()}", "GC_PAUSES_DIR": str(gc_dir)}


def print_full_collections(base: pathlib.Path, servers: dict[tuple[str, str], Server], since_s: float) -> None:
    """Per server, the full collections (generation 2) it made during the rounds, and its
    collections of each generation over its whole life (start-up included)."""
    print("\nfull garbage collections in each server during the rounds (load/gc_pauses)")
    for name, store in servers:
        record_file = base / f"{name}-{store}" / "gc" / f"{servers[name, store].pid}.json"
        if not record_file.exists():
            print(f"  {name:>8} {store:<6} no record: the server did not exit normally")
            continue
        record = json.loads(record_file.read_text())
        pauses_ms = [ms for ended_s, ms in record["full_passes"] if ended_s >= since_s]
        longest = f"{max(pauses_ms):.1f} ms" if pauses_ms else "-"
        lifetime = ", ".join(f"gen{gen} {count} in {ms:.0f} ms" for gen, (count, ms) in record["counts"].items())
        print(
            f"  {name:>8} {store:<6} {len(pauses_ms)} passes, longest {longest}, all {sum(pauses_ms):.1f} ms"
            f" (whole life: {lifetime})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", metavar="NAME=DIR", help="code trees to compare (DIR holds qm/)")
    parser.add_argument("--stores", default="sqlite,pg", help="sqlite, pg or both (default sqlite,pg)")
    parser.add_argument("--tasks", type=int, default=1000, help="sequential submits per server per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds; medians are reported (default 10)")
    parser.add_argument("--many", type=int, default=0, help="submit_many calls of this many tasks instead (0: submit)")
    parser.add_argument("--follow", action="store_true", help="also time one stream following each round's tasks")
    parser.add_argument(
        "--gc-pauses",
        action="store_true",
        help="also record each server's full garbage collections (load/gc_pauses) and report those of the rounds",
    )
    args = parser.parse_args()
    if args.many < 0 or args.many > args.tasks:
        parser.error(f"--many {args.many}: give 0 (single submits) or at most --tasks ({args.tasks})")
    trees = dict(tree.split("=", 1) for tree in args.trees)
    stores = args.stores.split(",")
    with tempfile.TemporaryDirectory(prefix="qm-bench-submit-ab-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = LocalRabbitMQ(base / "rabbitmq")
        broker_url = rabbitmq.start()
        postgres = LocalPostgres(base / "postgres") if "pg" in stores else None
        servers: dict[tuple[str, str], Server] = {}
        clients: dict[tuple[str, str], qm.Client] = {}
        try:
            if postgres is not None:
                postgres.start()
            for name, tree in trees.items():
                for store in stores:
                    data_dir = base / f"{name}-{store}"
                    data_dir.mkdir()
                    env = clean_env(server_env(pathlib.Path(tree), data_dir / "gc" if args.gc_pauses else None))
                    pg_url = postgres.create_database(f"ab_{name}") if store == "pg" and postgres else ""
                    extra = ["--store-url", pg_url] if pg_url else []
                    servers[name, store] = start_server(broker_url, data_dir, env=env, extra_args=extra)
                    clients[name, store] = qm.Client(server=servers[name, store].address)
                    for _ in range(WARM_TASKS):
                        clients[name, store].submit("math", "1 + 2")
            rounds: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in servers}
            rounds_started = time.monotonic()
            for number in range(args.rounds):
                order = list(servers) if number % 2 == 0 else list(reversed(servers))
                for key in order:
                    pg_pid = postgres.process.pid if key[1] == "pg" and postgres and postgres.process else None
                    run = one_round(servers[key], clients[key], args.tasks, args.many, args.follow, pg_pid)
                    rounds[key].append(run)
                print(f"round {number + 1} of {args.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for client in clients.values():
                client.close()
            for server in servers.values():
                server.stop()
            if postgres is not None:
                postgres.stop()
            rabbitmq.stop()
        if args.gc_pauses:  # each server wrote its record as it exited
            print_full_collections(base, servers, rounds_started)
    how = f"submit_many calls of {args.many}" if args.many else "sequential submits"
    print(f"\nmedians over {args.rounds} rounds of {args.tasks} tasks in {how} [lowest-highest]")
    for (name, store), runs in rounds.items():
        line = f"  {name:>8} {store:<6}"
        for field, label, unit, digits in SHOWN:
            values = [run[field] for run in runs if field in run]
            if values:
                line += (f" {label} {statistics.median(values):.{digits}f} {unit}"
                         f" [{min(values):.{digits}f}-{max(values):.{digits}f}] ")
        print(line.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
