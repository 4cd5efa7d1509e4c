"""Priority benchmark: how long a high-priority task waits behind a burst of low ones.

    .venv/bin/python load/bench_priority.py                   # ~1 minute a round
    .venv/bin/python load/bench_priority.py --rounds 3 --burst 60 --task-s 0.3 --json out.json

Starts a private RabbitMQ node (qm.testing: loopback, temp dir), one qm-server and one
qm-worker --procs N (tests/processes.py). Per round and mode: a burst of low tasks
(`test.sleep`, priority 0) is submitted, then, once the first of them runs, one more task:
priority 9 (`priority`) or priority 0 like the burst (`fifo`, the baseline without
priorities). Reported per mode: the last task's wait (started_at - created_at, both
stamped by the server and worker clocks of this host), in task times, and how many low
tasks started after it was accepted and before it started (with priorities at most one
per child, `tests/integration/test_priorities.py` asserts that bound). One box, shared:
a ratio of this machine, not a capacity; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import band_queues, delete_queues, start_server, start_worker, unique  # noqa: E402

#: Longest wait for a round's tasks to finish.
FINISH_TIMEOUT_S = 600.0


def one_round(client: qm.Client, queue: str, burst: int, task_s: float, last_priority: int) -> dict:
    lows = client.submit_many([("test.sleep", str(task_s))] * burst, queue=queue, priority=0)
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while client.status(lows[0]).state == "QUEUED" and time.monotonic() < deadline:
        time.sleep(0.05)
    last = client.submit("test.sleep", str(task_s), queue=queue, priority=last_priority)
    done = {s.task_id: s for s in client.results([*lows, last], timeout_s=FINISH_TIMEOUT_S)}
    accepted, started = done[last].created_at, done[last].started_at
    overtaking = sum(1 for t in lows if accepted < done[t].started_at < started)
    return {"wait_s": started - accepted, "wait_task_times": (started - accepted) / task_s, "overtaking": overtaking}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--burst", type=int, default=30, help="low-priority tasks per burst (default 30)")
    parser.add_argument("--task-s", type=float, default=0.3, help="each task's run time, seconds (default 0.3)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"priority": [], "fifo": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        node = LocalRabbitMQ(base / "rabbitmq")
        node.start()
        queue = unique("prio")
        server = worker = None
        try:
            server = start_server(node.url, base)
            worker = start_worker(node.url, procs=args.procs, queues=queue)
            with qm.Client(server.address) as client:
                for _ in range(args.rounds):
                    for mode, level in (("priority", 9), ("fifo", 0)):  # interleaved
                        results[mode].append(one_round(client, queue, args.burst, args.task_s, level))
        finally:
            for process in (worker, server):
                if process is not None:
                    process.stop()
            delete_queues(node.url, band_queues(queue))
            node.stop()
    summary = {
        mode: {
            "wait_s_median": round(statistics.median(r["wait_s"] for r in rounds), 3),
            "wait_task_times_median": round(statistics.median(r["wait_task_times"] for r in rounds), 2),
            "overtaking_max": max(r["overtaking"] for r in rounds),
        }
        for mode, rounds in results.items()
    }
    report = {"burst": args.burst, "task_s": args.task_s, "procs": args.procs, "rounds": args.rounds, **summary}
    for mode, numbers in summary.items():
        print(
            f"{mode:<9} last task waited {numbers['wait_s_median']:.3f} s "
            f"({numbers['wait_task_times_median']:.2f} task times), "
            f"at most {numbers['overtaking_max']} low tasks started after it was accepted"
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
