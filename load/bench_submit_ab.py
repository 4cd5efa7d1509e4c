"""Interleaved before/after of sequential submits on the server alone, on SQLite and PostgreSQL.

    git archive OLD qm | tar -x -C /tmp/before
    .venv/bin/python load/bench_submit_ab.py before=/tmp/before after=. [--tasks 1000] [--rounds 10]

One private RabbitMQ and one private PostgreSQL; per tree and store (`--stores`, default
`sqlite,pg`) one qm-server started with the tree first on PYTHONPATH, no worker, all up
at once. Each round, every server gets `--tasks` sequential qm.Client.submit calls of a
`math` task, in turns (the order flips every round), so the machine's drift falls on all
of them alike. Prints per tree and store the medians over the rounds of the submit
latency p50 and the server's CPU ms per submit. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from qm.testing.postgres import LocalPostgres  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import Server, clean_env, start_server  # noqa: E402

WARM_TASKS = 100


def server_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def one_round(server: Server, client: qm.Client, tasks: int) -> tuple[float, float]:
    """(latency p50 ms, server CPU ms per submit) of `tasks` sequential submits."""
    latencies_s = []
    cpu0 = server_cpu_s(server.pid)
    for _ in range(tasks):
        started = time.perf_counter()
        client.submit("math", "1 + 2")
        latencies_s.append(time.perf_counter() - started)
    return 1e3 * statistics.median(latencies_s), 1e3 * (server_cpu_s(server.pid) - cpu0) / tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", metavar="NAME=DIR", help="code trees to compare (DIR holds qm/)")
    parser.add_argument("--stores", default="sqlite,pg", help="sqlite, pg or both (default sqlite,pg)")
    parser.add_argument("--tasks", type=int, default=1000, help="sequential submits per server per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds; medians are reported (default 10)")
    args = parser.parse_args()
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
                env = clean_env({"PYTHONPATH": str(pathlib.Path(tree).resolve())})
                for store in stores:
                    data_dir = base / f"{name}-{store}"
                    data_dir.mkdir()
                    pg_url = postgres.create_database(f"ab_{name}") if store == "pg" and postgres else ""
                    extra = ["--store-url", pg_url] if pg_url else []
                    servers[name, store] = start_server(broker_url, data_dir, env=env, extra_args=extra)
                    clients[name, store] = qm.Client(server=servers[name, store].address)
                    for _ in range(WARM_TASKS):
                        clients[name, store].submit("math", "1 + 2")
            rounds: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in servers}
            for number in range(args.rounds):
                order = list(servers) if number % 2 == 0 else list(reversed(servers))
                for key in order:
                    rounds[key].append(one_round(servers[key], clients[key], args.tasks))
                print(f"round {number + 1} of {args.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for client in clients.values():
                client.close()
            for server in servers.values():
                server.stop()
            if postgres is not None:
                postgres.stop()
            rabbitmq.stop()
    print(f"\nmedians over {args.rounds} rounds of {args.tasks} sequential submits [lowest-highest]")
    for (name, store), runs in rounds.items():
        p50s, cpus = [run[0] for run in runs], [run[1] for run in runs]
        print(
            f"  {name:>8} {store:<6} p50 {statistics.median(p50s):.2f} ms [{min(p50s):.2f}-{max(p50s):.2f}]  "
            f"server {statistics.median(cpus):.3f} CPU ms/submit [{min(cpus):.3f}-{max(cpus):.3f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
