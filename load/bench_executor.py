"""qm.Executor benchmark (issue 9): calls made the concurrent.futures way, end to end.

    .venv/bin/python load/bench_executor.py                  # 3 runs of 2,000 calls a way
    .venv/bin/python load/bench_executor.py --runs 1 --calls 500 --json out.json
    .venv/bin/python load/bench_executor.py --quick          # correctness smoke, tiny sizes

Starts a private RabbitMQ node (or uses `--broker-url`), one qm-server and one
`qm-worker --procs 2` sharing an executor secret, with the test harness
(tests/processes.py). Then, `--runs` times, `--calls` calls of a trivial function
(`operator.add(i, 1)`) each way:

- `submit`: `[executor.submit(add, i, 1) for i in ...]`, then every future's result: what a
  concurrent.futures user writes. The submit phase is the loop of submit calls alone.
- `map`: `list(executor.map(add, range(n), ones))` (SubmitGroup calls of 500).

Rate = calls / (first submit -> last result). Prints a markdown table of medians
[lowest-highest run]; asserts nothing about speed (load/README.md). The exit code is 1
if a call returned a wrong result or a phase failed. Every wait is bounded.
"""
from __future__ import annotations

import argparse
import operator
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_dispatch import finish, machine  # noqa: E402  (load/ is the script's directory)

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import band_queues, delete_queues, start_server, start_worker, unique  # noqa: E402

SECRET = "bench-executor-secret-0123456789abcdef"  # executor.secret: at least 32 characters
#: Bound on all of a phase's results.
RESULTS_BOUND_S = 300.0
WAYS = ("submit", "map")


def run_submit(executor: qm.Executor, calls: int) -> dict[str, Any]:
    started = time.perf_counter()
    futures = [executor.submit(operator.add, i, 1) for i in range(calls)]
    submitted = time.perf_counter()
    deadline = time.monotonic() + RESULTS_BOUND_S
    results = [future.result(max(0.0, deadline - time.monotonic())) for future in futures]
    ended = time.perf_counter()
    return _phase(calls, results, started, ended, submitted)


def run_map(executor: qm.Executor, calls: int) -> dict[str, Any]:
    started = time.perf_counter()
    results = list(executor.map(operator.add, range(calls), [1] * calls, timeout=RESULTS_BOUND_S))
    return _phase(calls, results, started, time.perf_counter())


def _phase(calls: int, results: list[Any], started: float, ended: float, submitted: float | None = None
           ) -> dict[str, Any]:
    wrong = sum(1 for i, result in enumerate(results) if result != i + 1)
    phase = {"calls_per_s": calls / (ended - started), "wrong": wrong}
    if submitted is not None:
        phase["submit_calls_per_s"] = calls / (submitted - started)
    return phase


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of every way; medians are shown (3)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per way (2000)")
    parser.add_argument("--quick", action="store_true", help="correctness smoke: 1 run of 30 calls")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--json", metavar="PATH", help="also write every run's numbers as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.calls = 1, 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "runs": [], "failures": []}
    env = {"QM_EXECUTOR__SECRET": SECRET}
    queue = unique("bench-executor")
    with tempfile.TemporaryDirectory(prefix="qm-bench-executor-") as tmp:
        rabbitmq = None if args.broker_url else LocalRabbitMQ(pathlib.Path(tmp) / "rabbitmq")
        url = args.broker_url or rabbitmq.start()
        server = worker = None
        try:
            server = start_server(url, pathlib.Path(tmp), env=env)
            worker = start_worker(url, procs=2, queues=queue, env=env)
            with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
                executor.submit(operator.add, 0, 1).result(60)  # warm-up: the worker's first call
                for number in range(1, args.runs + 1):
                    run = {"submit": run_submit(executor, args.calls), "map": run_map(executor, args.calls)}
                    report["runs"].append(run)
                    print(f"run {number} of {args.runs}: " + ", ".join(
                        f"{way} {run[way]['calls_per_s']:,.0f} calls/s" for way in WAYS), flush=True)
        except Exception as exc:  # reported, and the exit code says so
            report["failures"].append(f"{type(exc).__name__}: {exc}")
        finally:
            for process in (worker, server):
                if process is not None:
                    process.stop()
            if rabbitmq is not None:
                rabbitmq.stop()
            elif server is not None:
                delete_queues(url, [f"qm.events.{server.server_id}", *band_queues(queue)])
    for run in report["runs"]:
        report["failures"] += [f"{way}: {run[way]['wrong']} wrong result(s)" for way in WAYS if run[way]["wrong"]]
    rows = [("submit one by one, then the results: calls/s end to end", "submit", "calls_per_s"),
            ("... the loop of submit calls alone: calls/s", "submit", "submit_calls_per_s"),
            ("map: calls/s end to end", "map", "calls_per_s")]
    lines = [f"| measure ({args.calls:,} calls of operator.add) | median [min-max] of {len(report['runs'])} |",
             "|---|---|"]
    for label, way, key in rows:
        values = [run[way][key] for run in report["runs"]]
        if values:
            lines.append(f"| {label} | {statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}] |")
    report["table"] = "\n".join(lines)
    print("\n" + report["table"])
    return finish(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
