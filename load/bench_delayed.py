"""Delayed-task benchmark (issue 14, item 2): how late delayed tasks start, never early.

    .venv/bin/python load/bench_delayed.py                    # 300 tasks, delays 0.5-12 s
    .venv/bin/python load/bench_delayed.py --tasks 50 --max-delay 4

Starts a private RabbitMQ in a temporary directory, one qm-server and one
`qm-worker --procs 2` (tests/processes.py, as the dispatch benchmark does), submits
`--tasks` `math` tasks in one submit_many, each with its own delay_s drawn evenly from
[0.5, --max-delay] (so most take a second hop through the delay tiers: 7 s = 5 s + 2 s),
and follows them to the end. For each task: lateness = started_at (the worker's RUNNING
event) - due time (created_at + delay_s, the server's clock; one host here). Prints the
lateness median, p95 and max, and how many started early (must be 0: exit 1 otherwise, or
if a task did not succeed). Asserts nothing about speed; the machine's load shows in it.
"""
from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from tests.processes import local_stack  # noqa: E402

#: Bound on waiting for every task to finish after the longest delay.
FINISH_BOUND_S = 120.0
PROCS = 2


def run(tasks: int, max_delay_s: float, seed: int) -> int:
    rng = random.Random(seed)
    delays_s = [rng.uniform(0.5, max_delay_s) for _ in range(tasks)]
    with local_stack("qm-bench-delayed-", procs=PROCS) as stack:
        server = stack.server
        with qm.Client(server.address) as client:
            items = [("math", f"{n} + 1", {"delay_s": delay_s}) for n, delay_s in enumerate(delays_s)]
            ids = client.submit_many(items)
            finals = {status.task_id: status
                      for status in client.results(ids, timeout_s=max_delay_s + FINISH_BOUND_S)}
    failed = [task_id for task_id in ids if finals[task_id].state != "SUCCEEDED"]
    lateness_s = sorted(finals[task_id].started_at - (finals[task_id].created_at + delay_s)
                        for task_id, delay_s in zip(ids, delays_s, strict=True))
    early = [late for late in lateness_s if late < 0]
    p95 = lateness_s[min(len(lateness_s) - 1, int(0.95 * len(lateness_s)))]
    print(f"{tasks} tasks, delays 0.5-{max_delay_s:g} s, qm-worker --procs {PROCS}: lateness median "
          f"{statistics.median(lateness_s) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max "
          f"{lateness_s[-1] * 1000:.0f} ms; started early: {len(early)}; not SUCCEEDED: {len(failed)}")
    return 1 if early or failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--max-delay", type=float, default=12.0, help="longest delay drawn, seconds")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    return run(args.tasks, args.max_delay, args.seed)


if __name__ == "__main__":
    sys.exit(main())
