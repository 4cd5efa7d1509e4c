"""CPU-slot benchmark (issue 14, item 5): a mix of 1-CPU and 2-CPU tasks on one worker.

    .venv/bin/python load/bench_slots.py                         # 40 small + 10 big, 0.3 s each
    .venv/bin/python load/bench_slots.py --small 20 --big 5 --hold 0.5

Starts a private RabbitMQ in a temporary directory, one qm-server and one
`qm-worker --procs 2` (tests/processes.py), submits `--small` 1-CPU and `--big` 2-CPU
`test.slot_probe` tasks interleaved (one big after every few small), each holding
`--hold` seconds, and follows them to the end. From the tasks' own start and end times
(wall clock, one host) it reports: the most CPU slots ever held at once (must be <= 2:
exit 1 otherwise, or if a task did not succeed), the makespan against the ideal
(slot-seconds / 2) as an efficiency, and the queue wait (started_at - created_at) of small
and big tasks (median, max). Asserts nothing about speed: the machine's load shows in it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from tests.processes import local_stack  # noqa: E402

#: Bound on waiting for every task to finish.
FINISH_BOUND_S = 600.0
PROCS = 2


def most_held(runs: list[tuple[float, float, int]]) -> int:
    """The most CPU slots held at once, from (start, end, cpus) of each run."""
    edges = sorted([(start, cpus) for start, _end, cpus in runs] + [(end, -cpus) for _start, end, cpus in runs],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    held = peak = 0
    for _at, change in edges:
        held += change
        peak = max(peak, held)
    return peak


def run(small: int, big: int, hold_s: float) -> int:
    every = max(1, small // max(1, big))
    items: list[tuple] = []
    for n in range(small + big):
        is_big = n % (every + 1) == every and sum(1 for item in items if item[2]["cpus"] == 2) < big
        items.append(("test.slot_probe", json.dumps({"hold_s": hold_s}), {"cpus": 2 if is_big else 1}))
    while sum(1 for item in items if item[2]["cpus"] == 2) < big:  # the rest of the big ones at the end
        items.append(("test.slot_probe", json.dumps({"hold_s": hold_s}), {"cpus": 2}))
    with local_stack("qm-bench-slots-", procs=PROCS) as stack:
        server = stack.server
        with qm.Client(server.address) as client:
            ids = client.submit_many(items)
            finals = {status.task_id: status for status in client.results(ids, timeout_s=FINISH_BOUND_S)}
    statuses = [finals[task_id] for task_id in ids]
    failed = [status for status in statuses if status.state != "SUCCEEDED"]
    if failed:
        print(f"{len(failed)} tasks did not succeed: {failed[:3]}")
        return 1
    runs = [(s.result["started_at"], s.result["ended_at"], s.cpus) for s in statuses]
    peak = most_held(runs)
    makespan_s = max(end for _start, end, _cpus in runs) - min(s.created_at for s in statuses)
    ideal_s = sum((end - start) * cpus for start, end, cpus in runs) / PROCS
    waits = {cpus: sorted(s.started_at - s.created_at for s in statuses if s.cpus == cpus) for cpus in (1, 2)}
    print(f"{small} x 1-CPU + {big} x 2-CPU tasks of {hold_s:g} s, qm-worker --procs {PROCS}: most slots held at "
          f"once {peak}; makespan {makespan_s:.2f} s, ideal {ideal_s:.2f} s, efficiency {ideal_s / makespan_s:.2f}")
    for cpus, wait in waits.items():
        if wait:
            print(f"  queue wait of {cpus}-CPU tasks: median {statistics.median(wait):.2f} s, max {wait[-1]:.2f} s")
    return 1 if peak > PROCS else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=40, help="1-CPU tasks")
    parser.add_argument("--big", type=int, default=10, help="2-CPU tasks")
    parser.add_argument("--hold", type=float, default=0.3, help="seconds each task holds")
    args = parser.parse_args(argv)
    return run(args.small, args.big, args.hold)


if __name__ == "__main__":
    sys.exit(main())
