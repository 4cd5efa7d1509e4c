"""Soak: does the server's cost per task stay flat while its store grows, and the WAL bounded?

    .venv/bin/python load/soak_store.py                          # 14 rounds x 1,500 tasks (~5 minutes)
    .venv/bin/python load/soak_store.py --rounds 20 --tasks-per-round 2000 --no-control --json soak.json

One qm-server (empty store, its data kept for the whole run), one `qm-worker --procs 2`,
a private RabbitMQ node on loopback, all started here as load/bench_store.py does. Round
after round, `--tasks-per-round` math tasks are submitted from `--threads` threads and
waited for; none is deleted (retention is a week), so the store holds every task of the
earlier rounds. Per round: server CPU per task (psutil, the qm-server process from the
first submit until every task of the round is terminal), submit latency p50/p99, the
round's rate, and the store's WAL file: its size at the end of the round and the largest
size seen (sampled every WAL_SAMPLE_S). At the end: the last round's CPU per task against
the first's, and the least-squares slope of CPU per task over tasks stored (issue #18
measured +0.4 ms per 1,000 stored before the fix). Nothing is asserted.

A control, unless --no-control: on a shared machine, what else runs moves CPU per task by
tens of percent (a busy sibling hyperthread slows every instruction, and a slower worker
means smaller event batches). So after each round the same round goes through a second
qm-server started fresh, with an empty store, on the same worker; the soaked server's
CPU per task over the control's shows what the store's growth alone adds. (Every server
applies every event, so the soaked store also takes in the control rounds' tasks and grows
twice as fast: stored counts are read from it.)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "load"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_store import Stack, rounded, run_round, wait_all  # noqa: E402

import qm  # noqa: E402
from tests.processes import unique  # noqa: E402

#: How often the WAL file's size is sampled during a round.
WAL_SAMPLE_S = 0.2
#: Tasks run before the first measured round (connections, queue declarations, caches).
WARMUP_TASKS = 200
MIB = 1024 * 1024


class WalSampler(threading.Thread):
    """The largest size of a file seen since the last `take()`, sampled every WAL_SAMPLE_S."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(daemon=True, name="wal-sampler")
        self.path = path
        self._largest = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def run(self) -> None:
        while not self._halt.wait(WAL_SAMPLE_S):
            size = self.size()
            with self._lock:
                self._largest = max(self._largest, size)

    def take(self) -> int:
        with self._lock:
            largest, self._largest = max(self._largest, self.size()), 0
        return largest

    def stop(self) -> None:
        self._halt.set()
        self.join(5.0)


def stored_tasks(db_path: pathlib.Path) -> int | None:
    """Tasks in the server's store, from its counters (read-only, a connection of our own;
    a store from before the counters is counted)."""
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
        try:
            try:
                return db.execute("SELECT value FROM counters WHERE name = 'tasks'").fetchone()[0]
            except sqlite3.OperationalError:  # no such table
                return db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None


def slope_ms_per_1000(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x, times 1,000 (ms per 1,000 tasks stored)."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None
    return 1000.0 * sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def control_round(stack: Stack, client: qm.Client, args: argparse.Namespace) -> dict[str, Any]:
    """The same round through a second, fresh server (empty store) right after, on the same
    worker: what a round costs on this machine at this moment with nothing stored. Returns
    once the soaked server has applied the control tasks' events too (every server applies
    every event), so none of that work falls into its next round."""
    server, control_client = stack.start_extra_server(unique("soak-control"))
    try:
        result = run_round(stack, control_client, args.tasks_per_round, args.threads, server=server)
    finally:
        stack.stop_extra_server(server, control_client)
    wait_all(client, result.pop("ids"))
    return result


def soak(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    server_id = unique("soak")
    client = stack.start(server_id)
    db_path = stack.server.data_dir / f"{server_id}.sqlite3"
    sampler = WalSampler(db_path.with_name(db_path.name + "-wal"))
    sampler.start()
    rounds = []
    try:
        if args.warmup:
            run_round(stack, client, args.warmup, args.threads)
        sampler.take()
        for number in range(args.rounds):
            before = stored_tasks(db_path)
            result = run_round(stack, client, args.tasks_per_round, args.threads)
            result.pop("ids")
            result.update(round=number, stored_before=before, wal_bytes_end=sampler.size(),
                          wal_bytes_max=sampler.take(), db_bytes=db_path.stat().st_size)
            if args.control:
                control = result["control"] = control_round(stack, client, args)
                result["vs_control"] = result["server_cpu_ms_per_task"] / control["server_cpu_ms_per_task"]
            rounds.append(result)
            versus = (f" (control {result['control']['server_cpu_ms_per_task']:.2f})"
                      if args.control else "")
            print(f"  round {number:2d}: stored {before}, "
                  f"server CPU {result['server_cpu_ms_per_task']:.2f}{versus} ms/task, "
                  f"submit p50/p99 {result['submit_ms_p50']:.1f}/{result['submit_ms_p99']:.1f} ms, "
                  f"{result['rate_per_s']:.0f} tasks/s, WAL end/max {result['wal_bytes_end'] / MIB:.1f}/"
                  f"{result['wal_bytes_max'] / MIB:.1f} MiB, states {result['states']}", flush=True)
    finally:
        sampler.stop()
        client.close()
        stack.stop()
    first, last = rounds[0]["server_cpu_ms_per_task"], rounds[-1]["server_cpu_ms_per_task"]
    adjusted = None
    if args.control:
        adjusted = 100.0 * (rounds[-1]["vs_control"] / rounds[0]["vs_control"] - 1.0)
    points = [(r["stored_before"], r["server_cpu_ms_per_task"]) for r in rounds
              if r["stored_before"] is not None]
    measured = rounds + [r["control"] for r in rounds if "control" in r]
    return {
        "rounds": rounds, "tasks": sum(r["tasks"] for r in rounds),
        "last_vs_first_cpu_pct": 100.0 * (last - first) / first if first else None,
        "last_vs_first_vs_control_pct": adjusted,
        "cpu_slope_ms_per_1000_stored": slope_ms_per_1000(points),
        "wal_bytes_max": max(r["wal_bytes_max"] for r in rounds),
        "not_succeeded": sum(n for r in measured for state, n in r["states"].items() if state != "SUCCEEDED"),
        "wrong_results": sum(r["wrong_results"] for r in measured),
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"\n  {'round':>5}  {'stored':>7}  {'CPU ms/task':>11}  {'control':>7}  {'ratio':>5}  "
          f"{'submit p50/p99 ms':>17}  {'tasks/s':>7}  {'WAL end/max MiB':>15}")
    for r in result["rounds"]:
        control = r.get("control", {}).get("server_cpu_ms_per_task")
        ratio = r.get("vs_control")
        print(f"  {r['round']:>5}  {r['stored_before'] or 0:>7}  {r['server_cpu_ms_per_task']:>11.2f}  "
              f"{control or 0:>7.2f}  {ratio or 0:>5.2f}  "
              f"{r['submit_ms_p50']:>8.1f}/{r['submit_ms_p99']:<8.1f}  {r['rate_per_s']:>7.0f}  "
              f"{r['wal_bytes_end'] / MIB:>7.1f}/{r['wal_bytes_max'] / MIB:<7.1f}")
    print(f"\n  tasks measured: {result['tasks']}; not SUCCEEDED: {result['not_succeeded']}; "
          f"wrong results: {result['wrong_results']}")
    print(f"  server CPU per task, last round vs first: {rounded(result['last_vs_first_cpu_pct'], 1)} %")
    if result["last_vs_first_vs_control_pct"] is not None:
        print(f"  the same against the control (ratio, last round vs first): "
              f"{rounded(result['last_vs_first_vs_control_pct'], 1)} %")
    print(f"  slope: {rounded(result['cpu_slope_ms_per_1000_stored'], 4)} ms per task per 1,000 tasks stored")
    print(f"  largest WAL seen: {result['wal_bytes_max'] / MIB:.1f} MiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Store soak: cost per task and WAL size as the store grows.")
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--tasks-per-round", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=16, help="client threads submitting")
    parser.add_argument("--warmup", type=int, default=WARMUP_TASKS, help="tasks run before round 0")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="after each round, the same round through a fresh server with an empty store")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--broker-url", default="", metavar="URL",
                        help="use this RabbitMQ instead of starting a private node (the smoke test does)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    meta = {"started_at": time.time(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(), "platform": platform.platform(), "rounds": args.rounds,
            "tasks_per_round": args.tasks_per_round, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="qm-soak-store-") as tmp:
        stack = Stack(pathlib.Path(tmp), args.broker_url)
        try:
            stack.start_node()
            result = soak(stack, args)
        finally:
            stack.stop_node()
    meta["total_wall_s"] = time.monotonic() - started
    print_report(result)
    print(f"\ntotal wall time {meta['total_wall_s']:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, **result}, indent=2, default=str) + "\n")
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
