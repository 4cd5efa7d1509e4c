"""Worker benchmarks for QueueMaster: CPU scaling, timeout accuracy, memory kills, throughput.

    .venv/bin/python load/bench_worker.py                       # all benchmarks (~2 minutes)
    .venv/bin/python load/bench_worker.py --only timeout_accuracy --json out.json

Everything runs on loopback and is started and stopped here: a private RabbitMQ node in a
temporary directory, one qm-server on port 0, and for each measurement a fresh qm-worker
on a queue of its own (real subprocesses, started with the test suite's harness in
tests/processes.py). Every wait is bounded. Nothing is asserted: the numbers are printed
as a table (and written as JSON with --json); see load/README.md for what each means.

Needs the test plugin qm-testtasks installed (scripts/setup --test) for test.spin,
test.stubborn and test.alloc.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from qm.client.client import TaskStatus  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import Server, Worker, start_server, start_worker, unique  # noqa: E402

#: Bound on waiting for one batch of tasks to reach terminal states.
BATCH_TIMEOUT_S = 90.0
#: Bound on waiting for the warm-up task of a fresh worker.
WARMUP_TIMEOUT_S = 30.0

USED_MIB = re.compile(r"used (\d+) MiB")


# -- helpers ----------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rounded(value: Any, digits: int = 3) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def wait_all(client: qm.Client, task_ids: list[str], timeout_s: float = BATCH_TIMEOUT_S) -> dict[str, TaskStatus]:
    """The terminal status of every task, from one watch stream (bounded by timeout_s)."""
    wanted = set(task_ids)
    final: dict[str, TaskStatus] = {}
    try:
        for status in client.watch(task_ids, timeout_s=timeout_s):
            if status.task_id in wanted and status.terminal:
                final[status.task_id] = status
                if len(final) == len(wanted):
                    break
    except TimeoutError:
        pass
    missing = wanted - final.keys()
    if missing:  # the stream timed out: report the last known state of the rest
        for task_id in missing:
            final[task_id] = client.status(task_id)
        states = Counter(final[t].state for t in missing)
        print(f"  ! {len(missing)} task(s) not terminal within {timeout_s:g} s: {dict(states)}", flush=True)
    return final


def warm_up(client: qm.Client, queue: str) -> None:
    """One trivial task through the fresh worker, so connection set-up is not measured."""
    task_id = client.submit("test.echo", "warm-up", queue=queue)
    client.result(task_id, timeout_s=WARMUP_TIMEOUT_S)


class Stack:
    """The private RabbitMQ node, one qm-server and a client; workers come and go."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.rabbitmq = LocalRabbitMQ(base / "rabbitmq")
        self.server: Server | None = None
        self.client: qm.Client | None = None
        self.workers: list[Worker] = []

    def start(self) -> None:
        t0 = time.monotonic()
        url = self.rabbitmq.start()
        t1 = time.monotonic()
        self.server = start_server(url, self.base)
        self.client = qm.Client(self.server.address)
        print(f"RabbitMQ up in {t1 - t0:.1f} s, qm-server on {self.server.address} "
              f"in {time.monotonic() - t1:.1f} s", flush=True)

    def worker(self, procs: int, env: dict[str, str] | None = None) -> tuple[Worker, str]:
        """A fresh worker on a fresh queue, warmed up; (worker, queue)."""
        queue = unique("bench")
        worker = start_worker(self.rabbitmq.url, procs=procs, queues=queue, env=env)
        self.workers.append(worker)
        warm_up(self.client, queue)
        return worker, queue

    def stop_worker(self, worker: Worker) -> None:
        worker.stop()
        if worker in self.workers:
            self.workers.remove(worker)

    def stop(self) -> None:
        for worker in list(self.workers):
            try:
                self.stop_worker(worker)
            except Exception:  # keep going: the node must stop whatever happened
                traceback.print_exc()
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            try:
                self.server.stop()
            except Exception:
                traceback.print_exc()
        self.rabbitmq.stop()


def cpu_seconds(pid: int, descendants: bool = False) -> float:
    """User + system CPU seconds of a process (and, if asked, of its live descendants)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + (root.children(recursive=True) if descendants else [])
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


class CpuMeter:
    """CPU seconds used by each part of the stack between start() and stop()."""

    def __init__(self, stack: "Stack", worker: Worker) -> None:
        self.parts: dict[str, Callable[[], float]] = {
            "worker_supervisor": lambda: cpu_seconds(worker.pid),
            "worker_pool_children": lambda: cpu_seconds(worker.pid, descendants=True) - cpu_seconds(worker.pid),
            "server": lambda: cpu_seconds(stack.server.pid),
            "rabbitmq": lambda: cpu_seconds(stack.rabbitmq.process.pid, descendants=True),
            "bench_client": lambda: cpu_seconds(os.getpid()),
        }
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {name: read() for name, read in self.parts.items()}

    def stop(self) -> dict[str, float]:
        return {name: read() - self.before[name] for name, read in self.parts.items()}


def states_of(statuses: Iterable[TaskStatus]) -> dict[str, int]:
    return dict(Counter(status.state for status in statuses))


def makespan(statuses: list[TaskStatus]) -> float | None:
    created = [s.created_at for s in statuses if s.created_at is not None]
    finished = [s.finished_at for s in statuses if s.finished_at is not None]
    if not created or not finished:
        return None
    return max(finished) - min(created)


# -- 1. cpu_scaling ----------------------------------------------------------------------

CPU_TASKS = 24
CPU_TASK_S = 0.25


def bench_cpu_scaling(stack: Stack) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for procs in (2, 1):
        worker, queue = stack.worker(procs)
        try:
            ids = [stack.client.submit("test.spin", str(CPU_TASK_S), queue=queue) for _ in range(CPU_TASKS)]
            statuses = list(wait_all(stack.client, ids).values())
        finally:
            stack.stop_worker(worker)
        span = makespan(statuses)
        ideal = CPU_TASKS * CPU_TASK_S / procs
        run_times = [s.finished_at - s.started_at for s in statuses if s.finished_at and s.started_at]
        counts = [int(s.result) for s in statuses if s.state == "SUCCEEDED" and str(s.result).isdigit()]
        results[f"procs{procs}"] = {
            "tasks": CPU_TASKS, "task_s": CPU_TASK_S, "procs": procs,
            "makespan_s": span, "ideal_s": ideal,
            "efficiency": (ideal / span) if span else None,
            "task_run_s_median": median(run_times), "task_run_s_max": max(run_times, default=None),
            "loops_per_task_median": median(counts),
            # test.spin runs for a fixed wall time, so makespan scales by construction; the
            # loop count is the work actually done: loops per second of makespan is the rate.
            "work_rate_loops_per_s": (sum(counts) / span) if span and counts else None,
            "states": states_of(statuses),
        }
    p1, p2 = results["procs1"]["makespan_s"], results["procs2"]["makespan_s"]
    results["speedup_2_over_1"] = (p1 / p2) if p1 and p2 else None
    w1, w2 = results["procs1"]["work_rate_loops_per_s"], results["procs2"]["work_rate_loops_per_s"]
    results["work_speedup_2_over_1"] = (w2 / w1) if w1 and w2 else None
    return results


def show_cpu_scaling(r: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = []
    for key in ("procs2", "procs1"):
        x = r[key]
        rows += [(f"{key}: makespan s", x["makespan_s"]), (f"{key}: ideal s", x["ideal_s"]),
                 (f"{key}: efficiency", x["efficiency"]),
                 (f"{key}: task run s median / max", f"{rounded(x['task_run_s_median'])} / "
                                                     f"{rounded(x['task_run_s_max'])}"),
                 (f"{key}: spin loops/task median", x["loops_per_task_median"]),
                 (f"{key}: work rate Mloops/s", x["work_rate_loops_per_s"] / 1e6
                  if x["work_rate_loops_per_s"] else None),
                 (f"{key}: states", x["states"])]
    rows.append(("speedup procs2 vs procs1 (makespan)", r["speedup_2_over_1"]))
    rows.append(("speedup procs2 vs procs1 (work done)", r["work_speedup_2_over_1"]))
    return rows


# -- 2. timeout_accuracy -----------------------------------------------------------------

TIMEOUT_TASKS = 20
TIMEOUT_S = 1.0


def bench_timeout_accuracy(stack: Stack) -> dict[str, Any]:
    worker, queue = stack.worker(2)  # no soft timeout unless a submission asks: the kill is at the limit
    try:
        ids = [stack.client.submit("test.stubborn", "10", queue=queue, timeout_s=TIMEOUT_S)
               for _ in range(TIMEOUT_TASKS)]
        statuses = list(wait_all(stack.client, ids, timeout_s=60.0).values())
    finally:
        stack.stop_worker(worker)
    late_ms = [(s.finished_at - s.started_at - TIMEOUT_S) * 1000.0 for s in statuses
               if s.finished_at is not None and s.started_at is not None]
    return {
        "tasks": TIMEOUT_TASKS, "timeout_s": TIMEOUT_S, "procs": 2,
        "lateness_ms_median": median(late_ms), "lateness_ms_p95": percentile(late_ms, 95),
        "lateness_ms_max": max(late_ms, default=None), "lateness_ms_min": min(late_ms, default=None),
        "over_100ms": sum(1 for v in late_ms if v > 100.0),
        "makespan_s": makespan(statuses),
        "states": states_of(statuses),
        "errors": sorted({s.error.splitlines()[0] if s.error else "" for s in statuses})[:3],
        "lateness_ms_by_start": [round(v, 1) for _, v in sorted(
            (s.started_at, (s.finished_at - s.started_at - TIMEOUT_S) * 1000.0) for s in statuses
            if s.finished_at is not None and s.started_at is not None)],
    }


def show_timeout_accuracy(r: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("lateness ms median", r["lateness_ms_median"]), ("lateness ms p95", r["lateness_ms_p95"]),
            ("lateness ms min / max", f"{rounded(r['lateness_ms_min'], 1)} / {rounded(r['lateness_ms_max'], 1)}"),
            ("tasks > 100 ms late", f"{r['over_100ms']} of {r['tasks']}"),
            ("makespan s (20 x 1 s on 2 procs)", r["makespan_s"]), ("states", r["states"])]


# -- 3. memory_kill ----------------------------------------------------------------------

MEMORY_TASKS = 5
MEMORY_ALLOC_MB = 4096
MEMORY_LIMIT_MB = 256
#: How often the benchmark's own RSS sampler looks at the pool children (a cross-check
#: of what the supervisor, sampling every worker.memory_check_interval_s, saw).
SAMPLE_INTERVAL_S = 0.005
MIB = 1024 * 1024


class RssSampler(threading.Thread):
    """Samples the RSS of a worker's pool children (its grandchildren: worker → forkserver
    → children) every SAMPLE_INTERVAL_S; `peak(t0, t1)` is the highest single-child RSS
    seen in that wall-clock window."""

    def __init__(self, worker_pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.root = psutil.Process(worker_pid)
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        cache: dict[int, psutil.Process] = {}
        while not self._halt.is_set():
            now = time.time()
            best = 0
            try:
                pids = [g.pid for c in self.root.children() for g in c.children(recursive=True)]
            except psutil.Error:
                pids = []
            for pid in pids:
                try:
                    proc = cache.get(pid) or cache.setdefault(pid, psutil.Process(pid))
                    best = max(best, proc.memory_info().rss)
                except psutil.Error:
                    cache.pop(pid, None)
            self.samples.append((now, best))
            self._halt.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(5.0)

    def peak(self, t0: float, t1: float) -> int:
        return max((rss for t, rss in self.samples if t0 <= t <= t1), default=0)


def _memory_run(stack: Stack, address_space_limit: bool) -> dict[str, Any]:
    env = {} if address_space_limit else {"QM_WORKER__ADDRESS_SPACE_LIMIT": "false"}
    worker, queue = stack.worker(1, env=env)
    sampler = RssSampler(worker.pid)
    sampler.start()
    try:
        ids = [stack.client.submit("test.alloc", str(MEMORY_ALLOC_MB), queue=queue, memory_limit_mb=MEMORY_LIMIT_MB)
               for _ in range(MEMORY_TASKS)]
        final = wait_all(stack.client, ids)
        statuses = [final[task_id] for task_id in ids]
    finally:
        sampler.stop()
        stack.stop_worker(worker)
    tasks = []
    for s in statuses:
        match = USED_MIB.search(s.error or "")
        kind = ("rss-watchdog kill" if match else "MemoryError (address-space cap)" if "MemoryError" in (s.error or "")
                else s.state)
        window = (s.started_at or 0.0, (s.finished_at or time.time()) + 0.05)
        bench_peak = sampler.peak(*window) / MIB
        tasks.append({
            "state": s.state, "how": kind,
            "supervisor_peak_mib": int(match.group(1)) if match else None,
            "bench_sampled_peak_mib": round(bench_peak, 1),
            "time_to_end_ms": ((s.finished_at - s.started_at) * 1000.0) if s.finished_at and s.started_at else None,
            "error": (s.error or "").splitlines()[0][:160] if s.error else "",
        })
    peaks = [t["supervisor_peak_mib"] for t in tasks if t["supervisor_peak_mib"] is not None]
    over = [p - MEMORY_LIMIT_MB for p in peaks]
    bench_peaks = [t["bench_sampled_peak_mib"] for t in tasks]
    return {
        "address_space_limit": address_space_limit, "procs": 1, "tasks": MEMORY_TASKS,
        "alloc_mb": MEMORY_ALLOC_MB, "limit_mb": MEMORY_LIMIT_MB,
        "states": states_of(statuses), "how": dict(Counter(t["how"] for t in tasks)),
        "supervisor_peak_mib_median": median(peaks), "supervisor_peak_mib_max": max(peaks, default=None),
        "overshoot_mib_median": median(over), "overshoot_mib_max": max(over, default=None),
        "bench_sampled_peak_mib_median": median(bench_peaks),
        "bench_sampled_peak_mib_max": max(bench_peaks, default=None),
        "time_to_end_ms_median": median([t["time_to_end_ms"] for t in tasks if t["time_to_end_ms"] is not None]),
        "per_task": tasks,
    }


def bench_memory_kill(stack: Stack) -> dict[str, Any]:
    return {"address_space_limit_on": _memory_run(stack, True),
            "rss_watchdog_only": _memory_run(stack, False)}


def show_memory_kill(r: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = []
    for key, label in (("address_space_limit_on", "AS limit on"), ("rss_watchdog_only", "RSS watchdog only")):
        x = r[key]
        rows += [(f"{label}: states", x["states"]), (f"{label}: ended by", x["how"]),
                 (f"{label}: supervisor peak MiB median / max",
                  f"{rounded(x['supervisor_peak_mib_median'], 1)} / {x['supervisor_peak_mib_max']}"),
                 (f"{label}: overshoot MiB median / max",
                  f"{rounded(x['overshoot_mib_median'], 1)} / {x['overshoot_mib_max']}"),
                 (f"{label}: bench-sampled peak MiB median / max",
                  f"{rounded(x['bench_sampled_peak_mib_median'], 1)} / {rounded(x['bench_sampled_peak_mib_max'], 1)}"),
                 (f"{label}: start -> end ms median", x["time_to_end_ms_median"])]
    return rows


# -- 4. throughput -----------------------------------------------------------------------

THROUGHPUT_TASKS = 2000
SUBMIT_THREADS = 8


def bench_throughput(stack: Stack) -> dict[str, Any]:
    worker, queue = stack.worker(2)
    client = stack.client
    try:
        def submit_range(indices: range) -> list[str]:
            return [client.submit("math", f"{i} + 1", queue=queue) for i in indices]

        chunks = [range(k, THROUGHPUT_TASKS, SUBMIT_THREADS) for k in range(SUBMIT_THREADS)]
        meter = CpuMeter(stack, worker)
        meter.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
            id_lists = list(pool.map(submit_range, chunks))
        submit_s = time.monotonic() - t0
        ids = [task_id for chunk in id_lists for task_id in chunk]
        final = wait_all(client, ids, timeout_s=120.0)
        collect_s = time.monotonic() - t0
        cpu = meter.stop()
        statuses = list(final.values())
    finally:
        stack.stop_worker(worker)
    expected = {task_id: str(i + 1) for chunk, task_ids in zip(chunks, id_lists, strict=True)
                for i, task_id in zip(chunk, task_ids, strict=True)}
    ok = [s for s in statuses if s.state == "SUCCEEDED"]
    wrong = sum(1 for s in ok if str(s.result) != expected[s.task_id])
    e2e_span = (max(s.finished_at for s in ok) - min(s.created_at for s in statuses)) if ok else None
    latency_ms = [(s.finished_at - s.created_at) * 1000.0 for s in ok]
    service_ms = [(s.finished_at - s.started_at) * 1000.0 for s in ok if s.started_at]
    wait_ms = [(s.started_at - s.created_at) * 1000.0 for s in ok if s.started_at]
    return {
        "tasks": THROUGHPUT_TASKS, "submit_threads": SUBMIT_THREADS, "procs": 2,
        "submit_s": submit_s, "submit_rate_per_s": THROUGHPUT_TASKS / submit_s,
        "end_to_end_s": e2e_span, "end_to_end_rate_per_s": (len(ok) / e2e_span) if e2e_span else None,
        "latency_ms_p50": percentile(latency_ms, 50), "latency_ms_p95": percentile(latency_ms, 95),
        "latency_ms_p99": percentile(latency_ms, 99), "latency_ms_max": max(latency_ms, default=None),
        "queue_wait_ms_p50": percentile(wait_ms, 50), "run_ms_p50": percentile(service_ms, 50),
        "run_ms_p99": percentile(service_ms, 99),
        "collect_wall_s": collect_s, "states": states_of(statuses), "wrong_results": wrong,
        "cpu_s": cpu, "cpu_ms_per_task": {name: 1000.0 * v / THROUGHPUT_TASKS for name, v in cpu.items()},
    }


def show_throughput(r: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("submit phase s", r["submit_s"]), ("submit rate tasks/s", r["submit_rate_per_s"]),
            ("end-to-end s (first created -> last finished)", r["end_to_end_s"]),
            ("end-to-end rate tasks/s", r["end_to_end_rate_per_s"]),
            ("latency ms p50 / p95 / p99", f"{rounded(r['latency_ms_p50'], 1)} / {rounded(r['latency_ms_p95'], 1)} / "
                                           f"{rounded(r['latency_ms_p99'], 1)}"),
            ("queue wait ms p50 (started - created)", r["queue_wait_ms_p50"]),
            ("run ms p50 / p99 (finished - started)", f"{rounded(r['run_ms_p50'], 1)} / {rounded(r['run_ms_p99'], 1)}"),
            ("states / wrong results", f"{r['states']} / {r['wrong_results']}"),
            ("CPU s during run (wall %.1f s)" % r["collect_wall_s"],
             ", ".join(f"{name} {v:.1f}" for name, v in r["cpu_s"].items())),
            ("CPU ms per task", ", ".join(f"{name} {v:.2f}" for name, v in r["cpu_ms_per_task"].items()))]


# -- driver ------------------------------------------------------------------------------

BENCHMARKS: dict[str, tuple[Callable[[Stack], dict], Callable[[dict], list]]] = {
    "cpu_scaling": (bench_cpu_scaling, show_cpu_scaling),
    "timeout_accuracy": (bench_timeout_accuracy, show_timeout_accuracy),
    "memory_kill": (bench_memory_kill, show_memory_kill),
    "throughput": (bench_throughput, show_throughput),
}


def print_table(name: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n== {name} " + "=" * max(0, 70 - len(name)))
    for label, value in rows:
        print(f"  {label:<{width}}  {rounded(value)}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="QueueMaster worker benchmarks (loopback, self-contained).")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these benchmarks: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    report: dict[str, Any] = {"meta": {
        "started_at": time.time(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "memory_mib": psutil.virtual_memory().total // MIB, "platform": platform.platform()}}
    started = time.monotonic()
    failed = False
    with tempfile.TemporaryDirectory(prefix="qm-bench-") as tmp:
        stack = Stack(pathlib.Path(tmp))
        try:
            stack.start()
            for name in names:
                run, show = BENCHMARKS[name]
                print(f"running {name} ...", flush=True)
                t0 = time.monotonic()
                try:
                    result = run(stack)
                except Exception as exc:  # report and go on with the next benchmark
                    traceback.print_exc()
                    report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    failed = True
                    continue
                result["wall_s"] = time.monotonic() - t0
                report[name] = result
                print_table(name, show(result) + [("benchmark wall s", result["wall_s"])])
        finally:
            stack.stop()
    report["meta"]["total_wall_s"] = time.monotonic() - started
    print(f"\ntotal wall time {report['meta']['total_wall_s']:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"JSON written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
