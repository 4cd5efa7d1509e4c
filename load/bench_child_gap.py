"""How long a child sits idle between two tasks while its queue has work, and what the
supervisor costs per task.

    .venv/bin/python load/bench_child_gap.py                    # 3 rounds, 2,000 + 200 tasks
    .venv/bin/python load/bench_child_gap.py --trivial 500 --sleepy 50 --rounds 1 --json out.json

Everything runs on loopback, started and stopped here: a private RabbitMQ node in a
temporary directory (qm.testing; or --broker-url), one qm-server on port 0, and per phase a fresh
`qm-worker --procs 2` (default config: quorum queue, auto prefetch) with its metrics on a
free port. Each phase starts its worker on a fresh, empty queue, waits for it to be
ready, starts the supervisor's CPU meter, then submits all its tasks in one `submit_many`
(one confirm wait for the lot), so the queue has work from the worker's first delivery to
its last; the phase ends when every task is terminal (one watch stream). Phases:

- trivial: N `math "1 + 2 * 5"` tasks;
- sleepy: M `test.sleep 0.05` tasks (needs qm-testtasks, installed by scripts/setup --test).

Per phase: tasks/s from the submit to the last terminal state; the
supervisor's CPU ms per task (each thread of the qm-worker pid, /proc schedstat, over that
span); the idle gap p50/p99 from `qm_worker_child_idle_gap_seconds` (interpolated within its buckets,
as Prometheus' histogram_quantile does) and how many gaps it observed; and the children's
busy share, sum of worker-timed run times / (procs x span). Nothing is asserted; the median
over rounds is printed. Every task must end SUCCEEDED with its expected result, or the
run fails (tests/load runs it tiny, for that).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_dispatch import own_cpu_meter  # noqa: E402  (load/ is the script's directory)

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import WORKER_READY, start_server, start_worker, unique  # noqa: E402

PROCS = 2
#: Bound on one phase's tasks reaching terminal states.
PHASE_TIMEOUT_S = 300.0
GAP_METRIC = "qm_worker_child_idle_gap_seconds"
RUN_METRIC = "qm_worker_task_run_seconds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """The worker's metrics: family name → [(sample name, labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def run_phase(url: str, client: qm.Client, task_type: str, payload: str, expected: str,
              count: int) -> dict[str, Any]:
    queue = unique("gap")
    port = free_port()
    worker = start_worker(url, procs=PROCS, queues=queue, extra_args=["--metrics-port", str(port)],
                          wait_ready=False)
    try:
        worker.wait_for_line(WORKER_READY, 60)
        # The meter starts before the first task exists: with the tasks queued ahead of the
        # worker, a loaded host could read READY after a tiny phase had already finished.
        supervisor_cpu_s = own_cpu_meter(worker.pid)  # ns-exact: a few trivial tasks are under one 10 ms tick
        t0 = time.monotonic()
        ids = client.submit_many([(task_type, payload)] * count, queue=queue)
        left, wrong = set(ids), []
        for status in client.watch(ids, timeout_s=PHASE_TIMEOUT_S):
            if status.terminal and status.task_id in left:
                left.discard(status.task_id)
                if status.state != "SUCCEEDED" or status.result != expected:
                    wrong.append(f"{status.task_id}: {status.state} {status.result!r} {status.error}")
                if not left:
                    break
        span_s = time.monotonic() - t0
        cpu_s = supervisor_cpu_s()
        metrics = scrape(port)
    finally:
        worker.stop()
    if left or wrong:
        raise RuntimeError(f"{len(left)} of {count} tasks not terminal within {PHASE_TIMEOUT_S} s; "
                           f"{len(wrong)} not SUCCEEDED with {expected!r}: {wrong[:5]}")
    gaps = [(float(labels["le"]), value) for name, labels, value in metrics.get(GAP_METRIC, [])
            if name.endswith("_bucket")]
    run_sum_s = sum(value for name, _labels, value in metrics[RUN_METRIC] if name.endswith("_sum"))
    return {"tasks_per_s": count / span_s, "supervisor_cpu_ms_per_task": 1000 * cpu_s / count,
            "gap_p50_ms": _ms(histogram_quantile(0.5, gaps)), "gap_p99_ms": _ms(histogram_quantile(0.99, gaps)),
            "gaps_observed": max((value for _upper, value in gaps), default=0),
            "children_busy_share": run_sum_s / (PROCS * span_s), "tasks": count}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def median_of(rounds: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trivial", type=int, default=2000, help="math tasks per round (default 2000)")
    parser.add_argument("--sleepy", type=int, default=200, help="0.05 s test.sleep tasks per round (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is printed (default 3)")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--json", metavar="PATH", help="also write every round's results as JSON here")
    args = parser.parse_args(argv)
    phases = [("trivial", "math", "1 + 2 * 5", "11", args.trivial),
              ("sleepy 0.05 s", "test.sleep", "0.05", "0.05", args.sleepy)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in phases}
    with tempfile.TemporaryDirectory(prefix="qm-gap-") as tmp:
        rabbitmq = None if args.broker_url else LocalRabbitMQ(pathlib.Path(tmp) / "rabbitmq")
        url = rabbitmq.start() if rabbitmq is not None else args.broker_url
        server = None
        try:
            server = start_server(url, pathlib.Path(tmp))
            with qm.Client(server.address) as client:
                for round_no in range(args.rounds):
                    for name, task_type, payload, expected, count in phases:
                        if count:
                            result = run_phase(url, client, task_type, payload, expected, count)
                            results[name].append(result)
                            print(f"round {round_no + 1} {name}: " + ", ".join(
                                f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                                for key, value in result.items()), flush=True)
        finally:
            if server is not None:
                server.stop()
            if rabbitmq is not None:
                rabbitmq.stop()
    print(f"\nmedian of {args.rounds} round(s), qm-worker --procs {PROCS}, {psutil.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    keys = ["tasks_per_s", "supervisor_cpu_ms_per_task", "gap_p50_ms", "gap_p99_ms", "gaps_observed",
            "children_busy_share"]
    print(f"{'phase':<16}" + "".join(f"{key:>28}" for key in keys))
    for name, rounds in results.items():
        if rounds:
            cells = [median_of(rounds, key) for key in keys]
            print(f"{name:<16}" + "".join(f"{'-' if c is None else f'{c:.3f}':>28}" for c in cells))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
