"""Periodic schedules benchmark (issue 14, item 2): how late ticks fire, and at what cost.

    .venv/bin/python load/bench_schedules.py                      # 20 schedules every second, 30 s
    .venv/bin/python load/bench_schedules.py --schedules 200 --seconds 20

Starts a private RabbitMQ in a temporary directory, one qm-server and one
`qm-worker --procs 2` (tests/processes.py, as the other benchmarks do), adds
`--schedules` schedules of a `math` task, each ticking every second, lets them run for
`--seconds`, removes them and waits for every fired task. Per fired task: fire lateness =
the task's created_at (when the server fired it) - its tick (from its idempotency key,
schedule:<id>:<tick>); run lateness = started_at - tick. Prints their median, p95 and
max, the ticks fired and missed (coalesced: a late loop fires the latest tick once), and
the server's CPU seconds per fired task. Exit 1 if a tick fired twice or a task did not
succeed. Asserts nothing about speed; the machine's load shows in it.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sqlite3
import statistics
import sys
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from tests.processes import local_stack  # noqa: E402

#: Bound on waiting for every fired task to finish after the schedules are removed.
FINISH_BOUND_S = 120.0
PROCS = 2


def tick_of(key: str) -> float:
    return datetime.datetime.fromisoformat(key.split(":", 2)[2].replace("Z", "+00:00")).timestamp()


def run(schedules: int, seconds: float) -> int:
    with local_stack("qm-bench-schedules-", procs=PROCS) as stack:
        server = stack.server
        cpu = psutil.Process(server.pid)
        with qm.Client(server.address) as client:
            for n in range(schedules):
                client.add_schedule("math", f"{n} + 1", every_s=1, schedule_id=f"bench-{n:04d}")
            cpu_before = sum(cpu.cpu_times()[:2])
            time.sleep(seconds)  # the benchmark's duration, not a wait for a condition
            cpu_s = sum(cpu.cpu_times()[:2]) - cpu_before
            removed = [client.remove_schedule(f"bench-{n:04d}") for n in range(schedules)]
            path = server.data_dir / f"{server.server_id}.sqlite3"
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT idempotency_key, task_id FROM tasks WHERE schedule_id != ''").fetchall()
            ids = [task_id for _key, task_id in rows]
            finals = {s.task_id: s for s in client.results(ids, timeout_s=FINISH_BOUND_S)}
    keys = [key for key, _task_id in rows]
    doubled = len(keys) - len(set(keys))
    failed = [task_id for task_id in ids if finals[task_id].state != "SUCCEEDED"]
    fire_s = sorted(finals[task_id].created_at - tick_of(key) for key, task_id in rows)
    run_s = sorted(finals[task_id].started_at - tick_of(key) for key, task_id in rows)
    missed = sum(schedule.missed_ticks for schedule in removed)
    print(f"{schedules} schedule(s) every 1 s for {seconds:g} s: {len(rows)} ticks fired, {missed} missed "
          f"(coalesced), {doubled} fired twice, {len(failed)} not succeeded")
    for name, values in (("fire lateness", fire_s), ("run lateness", run_s)):
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        print(f"{name}: median {statistics.median(values) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
              f"max {values[-1] * 1000:.0f} ms")
    print(f"qm-server CPU while firing: {cpu_s:.2f} s, {cpu_s / max(1, len(rows)) * 1000:.2f} ms per fired task "
          "(its whole process: events of the tasks run included)")
    return 1 if doubled or failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", type=int, default=20, help="schedules, each every second (default 20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long they run (default 30)")
    args = parser.parse_args()
    return run(args.schedules, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
