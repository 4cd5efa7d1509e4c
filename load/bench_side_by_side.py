#!/usr/bin/env python3
"""QueueMaster next to Dramatiq and Celery, as issue 9 measured them: one RabbitMQ, one run.

Starts a private RabbitMQ node (or uses --broker-url), then keeps all three up on it:
QueueMaster's qm-server and `qm-worker --procs 2` (default config), Dramatiq's
`dramatiq --processes 2 --threads 1` (RabbitmqBroker with its defaults) and Celery's
`celery worker --pool prefork -c 2` (its defaults). All run the same task bodies
(load/dramatiq_actors.py, load/celery_tasks.py). Each round measures every system in
turn (the order rotates from round to round):

1. 5,000 trivial tasks end to end, sent one at a time by one client thread
   (`qm.Client.submit`, Dramatiq's `send()`, Celery's `delay()`), and the send phase
   alone; for QueueMaster also through `submit_many`; for Dramatiq also with
   `confirm_delivery=True` (a send that waits for RabbitMQ's publisher confirm, as every
   QueueMaster submit does).
2. The CPU ms per task of each part: the client (this process), the worker side
   (QueueMaster: supervisor and children; the others: their worker processes),
   qm-server, RabbitMQ.
3. The round trip of 300 sequential tasks: send -> the run's end seen by the client
   (QueueMaster: the terminal state on a StreamTaskResults stream; the others: the run's
   datagram, load/bench_done.py, their fastest possible report).
4. 24 x 0.25 s pure-Python tasks on 2 processes: makespan and efficiency from the
   worker-timed task times.

Prints medians [lowest-highest round] side by side; `--json` writes every round. Asserts
nothing about speed; the exit code is 1 if a task did not end with the right result.
Every wait is bounded. Dramatiq and Celery are benchmark-only dependencies (the `bench`
extra: `pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

LOAD = pathlib.Path(__file__).resolve().parent
REPO = LOAD.parent
for path in (REPO, LOAD):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_dispatch import (  # noqa: E402
    MATH_PAYLOAD,
    MATH_RESULT,
    PROCS,
    ROUND_TRIP_BOUND_S,
    CpuMeter,
    Stack,
    cpu_bound,
    e2e_sequential,
    e2e_submit_many,
    finish,
    lookup,
    machine,
    own_cpu_meter,
    percentile,
    round_trip,
    tree_cpu_meter,
)
from bench_done import DoneSocket  # noqa: E402

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import delete_queues  # noqa: E402

#: Bound on one batch of another system's runs ending (a phase fails past it).
FINISH_BOUND_S = 300.0
#: Bound on another system's worker taking its first tasks, and on its stopping.
START_BOUND_S = 60.0
STOP_BOUND_S = 30.0
SYSTEMS = ("dramatiq", "celery", "qm")


# -- Dramatiq's and Celery's side ----------------------------------------------------------


class Rival:
    """Another system's worker on the shared RabbitMQ, and its sending side in this process.
    Subclasses: how to start the worker, send a task, and name the queues to clean up."""

    name = ""

    def __init__(self, base: pathlib.Path, broker_url: str, queue: str) -> None:
        self.base = base
        self.broker_url = broker_url
        self.queue = queue
        self.done = DoneSocket(base / f"{self.name}-done.sock")
        self.process: subprocess.Popen | None = None
        self.broker_pid: int | None = None  # RabbitMQ's, for its CPU
        self._tags = iter(range(1, 1 << 62))

    def set_up(self) -> list[str]:
        """Ready the sending side in this process (and what the worker's module reads from
        the environment); the worker's command line."""
        raise NotImplementedError

    def send(self, confirm: bool, task: str, payload: str, tag: int) -> None:
        raise NotImplementedError

    def queues(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        command = self.set_up()
        env = dict(os.environ, QM_BENCH_DONE_SOCKET=self.done.path,
                   PYTHONPATH=os.pathsep.join(filter(None, (str(LOAD), str(REPO), os.environ.get("PYTHONPATH")))))
        log = (self.base / f"{self.name}.log").open("wb")
        self.process = subprocess.Popen(command, cwd=LOAD, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        tags = [self.submit() for _ in range(4 * PROCS)]  # every process consuming
        try:
            self.done.wait(tags, START_BOUND_S)
        except TimeoutError as exc:
            log_tail = (self.base / f"{self.name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{self.name}'s worker did not run its first tasks ({exc}); its log ends:\n{log_tail}"
            ) from exc

    def submit(self, confirm: bool = False, task: str = "trivial", payload: str = MATH_PAYLOAD) -> int:
        tag = next(self._tags)
        self.send(confirm, task, payload, tag)
        return tag

    def cpu_meter(self) -> CpuMeter:
        assert self.process is not None
        pid = self.process.pid
        return CpuMeter(parts={"client": lambda: own_cpu_meter(os.getpid()),
                               "worker": lambda: tree_cpu_meter(pid),
                               "rabbitmq": lambda: tree_cpu_meter(self.broker_pid)})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_BOUND_S)
        self.done.close()
        delete_queues(self.broker_url, self.queues())


class Dramatiq(Rival):
    """`dramatiq --processes 2 --threads 1 dramatiq_actors`; sends with Dramatiq's default
    broker, or one with `confirm_delivery=True`."""

    name = "dramatiq"

    def set_up(self) -> list[str]:
        # the actors module's broker and queue, in this process too
        os.environ.update(QM_BENCH_BROKER_URL=self.broker_url, QM_BENCH_DRAMATIQ_QUEUE=self.queue)
        import dramatiq_actors
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        self.actors = dramatiq_actors
        self.confirming = RabbitmqBroker(url=self.broker_url, confirm_delivery=True)
        return [sys.executable, "-m", "dramatiq", "--processes", str(PROCS), "--threads", "1", "dramatiq_actors"]

    def send(self, confirm: bool, task: str, payload: str, tag: int) -> None:
        message = getattr(self.actors, task).message(tag, payload)
        (self.confirming if confirm else self.actors.dramatiq.get_broker()).enqueue(message)

    def queues(self) -> list[str]:
        return [self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"]


class Celery(Rival):
    """`celery -A celery_tasks worker --pool prefork -c 2`; sends with `delay()`."""

    name = "celery"

    def set_up(self) -> list[str]:
        os.environ.update(QM_BENCH_BROKER_URL=self.broker_url, QM_BENCH_CELERY_QUEUE=self.queue)
        import celery_tasks

        self.tasks = celery_tasks
        return [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool", "prefork",
                "-c", str(PROCS), "--loglevel", "WARNING"]

    def send(self, confirm: bool, task: str, payload: str, tag: int) -> None:
        assert not confirm, "Celery is measured with its defaults only"
        getattr(self.tasks, task).delay(tag, payload)

    def queues(self) -> list[str]:
        return [self.queue]


def _right(results: dict[int, tuple[float, str]], expected: int) -> dict[str, int]:
    return {"expected": expected, "succeeded_right": sum(1 for _, r in results.values() if r == MATH_RESULT)}


def rival_sequential(side: Rival, count: int, confirm: bool) -> dict[str, Any]:
    meter = side.cpu_meter().start()
    tags = [side.submit(confirm) for _ in range(count)]
    submit_s = time.monotonic() - meter.started
    results = side.done.wait(tags, FINISH_BOUND_S)
    cpu_s, wall_s = meter.stop()
    return {"tasks_per_s": count / wall_s, "submit_per_s": count / submit_s,
            "cpu_ms_per_task": {part: 1000.0 * s / count for part, s in cpu_s.items()},
            "cpu_ms_per_task_all": 1000.0 * sum(cpu_s.values()) / count, "check": _right(results, count)}


def rival_round_trip(side: Rival, count: int) -> dict[str, Any]:
    latencies_ms, results = [], {}
    for _ in range(count):
        t0 = time.perf_counter()
        tag = side.submit()
        (at, result), = side.done.wait([tag], ROUND_TRIP_BOUND_S).values()
        latencies_ms.append((at - t0) * 1000.0)
        results[tag] = (at, result)
    return {"ms_p50": percentile(latencies_ms, 50), "ms_p99": percentile(latencies_ms, 99),
            "check": _right(results, count)}


def rival_cpu_bound(side: Rival, count: int, spin_s: float) -> dict[str, Any]:
    sent_at = time.time()
    tags = [side.submit(task="spin_timed", payload=str(spin_s)) for _ in range(count)]
    results = side.done.wait(tags, FINISH_BOUND_S)
    times = [tuple(float(f) for f in result.split()[1:3]) for _, result in results.values()]
    span_s = max(end for _, end in times) - sent_at
    run_s = sum(end - start for start, end in times)
    return {"makespan_s": span_s, "efficiency": run_s / (PROCS * span_s),
            "check": {"expected": count, "succeeded_right": len(times)}}


def rival_round(side: Rival, args: argparse.Namespace) -> dict[str, Any]:
    phases = {"sequential": rival_sequential(side, args.tasks, confirm=False)}
    if isinstance(side, Dramatiq):
        phases["sequential_confirmed"] = rival_sequential(side, args.tasks, confirm=True)
    return {**phases, "round_trip": rival_round_trip(side, args.round_trips),
            "cpu_bound": rival_cpu_bound(side, args.spin_tasks, args.spin_s)}


# -- QueueMaster's side (bench_dispatch's phases) -------------------------------------------


def qm_cpu_parts(cpu_ms: dict[str, float]) -> dict[str, float]:
    """bench_dispatch's parts, with the worker side as one (supervisor + children)."""
    return {"client": cpu_ms["client"], "worker": cpu_ms["supervisor"] + cpu_ms["children"],
            "server": cpu_ms["server"], "rabbitmq": cpu_ms["rabbitmq"]}


def qm_round(stack: Stack, client: qm.Client, args: argparse.Namespace) -> dict[str, Any]:
    sequential = e2e_sequential(stack, client, args.tasks)
    many = e2e_submit_many(stack, client, args.tasks)
    for phase in (sequential, many):
        phase["cpu_ms_per_task"] = qm_cpu_parts(phase["cpu_ms_per_task"])
    return {"sequential": sequential, "submit_many": many,
            "round_trip": round_trip(stack, client, args.round_trips),
            "cpu_bound": cpu_bound(stack, client, args.spin_tasks, args.spin_s)}


# -- the report ---------------------------------------------------------------------------

#: The table's columns: (heading, system, its phase of one-at-a-time sends).
COLUMNS = (
    ("Dramatiq", "dramatiq", "sequential"),
    ("Dramatiq, confirm_delivery", "dramatiq", "sequential_confirmed"),
    ("Celery", "celery", "sequential"),
    ("QueueMaster", "qm", "sequential"),
)
#: Which columns a row has a number in: every one, one per system (not again with
#: confirms), or QueueMaster's only.
ALL, PER_SYSTEM, QM_ONLY = "all", "per system", "qm only"
#: (row, format, path into a round's numbers ({system}, {phase}), which columns).
ROWS = (
    ("trivial tasks end to end, one send/submit at a time, tasks/s", "{:,.0f}", "{system}/{phase}/tasks_per_s", ALL),
    ("... the send/submit phase alone, tasks/s", "{:,.0f}", "{system}/{phase}/submit_per_s", ALL),
    ("trivial tasks end to end through submit_many, tasks/s", "{:,.0f}", "qm/submit_many/tasks_per_s", QM_ONLY),
    ("CPU ms per task, all processes, one at a time", "{:.2f}", "{system}/{phase}/cpu_ms_per_task_all", ALL),
    ("... of which the worker side (worker processes; supervisor + children)", "{:.2f}",
     "{system}/{phase}/cpu_ms_per_task/worker", ALL),
    ("... of which qm-server", "{:.2f}", "qm/sequential/cpu_ms_per_task/server", QM_ONLY),
    ("... of which RabbitMQ", "{:.2f}", "{system}/{phase}/cpu_ms_per_task/rabbitmq", ALL),
    ("... of which the client", "{:.2f}", "{system}/{phase}/cpu_ms_per_task/client", ALL),
    ("CPU ms per task, all processes, submit_many", "{:.2f}", "qm/submit_many/cpu_ms_per_task_all", QM_ONLY),
    ("round trip, sequential, p50 ms", "{:.2f}", "{system}/round_trip/ms_p50", PER_SYSTEM),
    ("round trip, sequential, p99 ms", "{:.2f}", "{system}/round_trip/ms_p99", PER_SYSTEM),
    ("CPU-bound tasks: makespan, s", "{:.2f}", "{system}/cpu_bound/makespan_s", PER_SYSTEM),
    ("CPU-bound tasks: efficiency (worker-timed)", "{:.3f}", "{system}/cpu_bound/efficiency", PER_SYSTEM),
)


def row_paths(template: str, applies: str, columns: Sequence[tuple[str, str, str]]) -> list[str | None]:
    """The path of each column's number in a row (None: not measured for that column)."""
    paths: list[str | None] = []
    for _heading, system, phase in columns:
        wanted = (applies == ALL or (applies == PER_SYSTEM and phase == "sequential")
                  or (applies == QM_ONLY and system == "qm"))
        paths.append(template.format(system=system, phase=phase) if wanted else None)
    return paths


def cell(rounds: list[dict[str, Any]], path: str | None, fmt: str) -> str:
    if path is None:
        return "—"
    values = [v for v in (lookup(r, path) for r in rounds) if v is not None]
    if not values:
        return "?"
    shown = fmt.format(statistics.median(values))
    return shown if len(values) == 1 else f"{shown} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def markdown_table(rounds: list[dict[str, Any]], args: argparse.Namespace) -> str:
    what = f"median of {len(rounds)} rounds [min–max]" if len(rounds) > 1 else "one round"
    columns = [column for column in COLUMNS if column[1] in args.systems]
    lines = [f"| measure ({what}; {args.tasks:,} tasks, {args.round_trips} round trips, "
             f"{args.spin_tasks} x {args.spin_s:g} s) | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, fmt, template, applies in ROWS:
        cells = (cell(rounds, path, fmt) for path in row_paths(template, applies, columns))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures(rounds: list[dict[str, Any]]) -> list[str]:
    found = []
    for number, round_ in enumerate(rounds, 1):
        for system in SYSTEMS:
            for phase, numbers in round_.get(system, {}).items():
                check = numbers.get("check", {})
                if check.get("succeeded_right") != check.get("expected"):
                    found.append(f"round {number}, {system} {phase}: {check}")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every system (3)")
    parser.add_argument("--tasks", type=int, default=5000, help="trivial tasks per end-to-end phase (5000)")
    parser.add_argument("--round-trips", type=int, default=300, help="sequential round trips (300)")
    parser.add_argument("--spin-tasks", type=int, default=24, help="CPU-bound tasks (24)")
    parser.add_argument("--spin-s", type=float, default=0.25, help="seconds each CPU-bound task spins (0.25)")
    parser.add_argument("--quick", action="store_true",
                        help="correctness smoke: 1 round, 30 tasks, 10 round trips, 4 x 0.05 s spins")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--queue", default="default", help="QueueMaster's logical queue (default)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"which to measure, comma-separated ({','.join(SYSTEMS)}); QueueMaster always runs")
    parser.add_argument("--json", metavar="PATH", help="also write every round's numbers as JSON here")
    args = parser.parse_args(argv)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    args.systems = [name for name in SYSTEMS if name in args.systems or name == "qm"]
    if args.quick:
        args.rounds, args.tasks, args.round_trips, args.spin_tasks, args.spin_s = 1, 30, 10, 4, 0.05
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for name in args.systems:
            if name != "qm":
                importlib.import_module(name)
    except ImportError as exc:
        print(f"{exc.name} is not installed: pip install -e '.[bench]' (in the project's venv)", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "rounds": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qm-bench-side-by-side-") as tmp:
        base = pathlib.Path(tmp)
        node = None if args.broker_url else LocalRabbitMQ(base / "rabbitmq")
        broker_url = args.broker_url or node.start()
        stack = Stack(base, broker_url, args.queue)
        rivals: list[Rival] = []
        try:
            stack.start()
            for kind in (kind for kind in (Dramatiq, Celery) if kind.name in args.systems):
                rival = kind(base, broker_url, f"qm-bench-{kind.name}-{args.queue}")
                rivals.append(rival)
                rival.broker_pid = stack.broker_pid
                rival.start()
            sides: dict[str, Rival] = {rival.name: rival for rival in rivals}
            with qm.Client(stack.server.address) as client:
                client.result(client.submit("math", MATH_PAYLOAD, queue=stack.queue), timeout_s=60)  # warm-up
                for number in range(1, args.rounds + 1):
                    shift = (number - 1) % len(args.systems)
                    order = args.systems[shift:] + args.systems[:shift]
                    print(f"round {number} of {args.rounds}: {', then '.join(order)}", flush=True)
                    round_: dict[str, Any] = {"load_avg_1m": os.getloadavg()[0]}
                    for system in order:
                        t0 = time.monotonic()
                        round_[system] = (qm_round(stack, client, args) if system == "qm"
                                          else rival_round(sides[system], args))
                        print(f"  {system}: {time.monotonic() - t0:.1f} s", flush=True)
                    report["rounds"].append(round_)
        finally:
            for rival in rivals:
                rival.stop()
            stack.stop()
            if node is not None:
                node.stop()
    report["wall_s"] = time.monotonic() - started
    report["failures"] = failures(report["rounds"])
    report["table"] = markdown_table(report["rounds"], args)
    print()
    print(report["table"])
    loads = ", ".join(f"{r['load_avg_1m']:.1f}" for r in report["rounds"])
    print(f"\n{report['machine']['nproc']} x {report['machine']['cpu_model']}; load average (1 min) before "
          f"each round: {loads}; total {report['wall_s']:.0f} s")
    return finish(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
