"""Dispatch benchmark (issue 9): what QueueMaster's own processes cost per task.

    .venv/bin/python load/bench_dispatch.py                      # 3 runs, the issue's sizes (~10 min)
    .venv/bin/python load/bench_dispatch.py --runs 1 --tasks 1000 --json out.json
    .venv/bin/python load/bench_dispatch.py --quick              # correctness smoke, tiny sizes

Starts everything itself on loopback, with the test harness (tests/processes.py): a
private RabbitMQ node in a temporary directory (qm.testing.rabbitmq; or `--broker-url`
for a running one), one qm-server and one `qm-worker --procs 2`, as real processes on the
default configuration (quorum queues, prefetch auto). Then, `--runs` times on that stack:

1. 5,000 `math` tasks ("1 + 2 * 5") end to end through each way of submitting: one
   qm.Client.submit after the other (its call latencies are the sequential-submit
   numbers), qm.Client.submit_many, qm.aio.Client.submit under asyncio.gather,
   qm.aio.Client.submit_many; the results followed on one StreamTaskResults stream
   (client.results). Rate = tasks / (first submit -> last result seen). CPU per task of
   each process (psutil user+system, reaped children included) over the same span.
2. Round trip: 300 tasks one at a time, submit -> terminal state seen on one long-lived
   StreamTaskResults stream that each id is added to after its submit; and the p50 of
   each step's time from the submit call: the record made (created_at), the submit
   answered, the run started and ended (started_at, finished_at).
3. CPU-bound: 24 x `test.spin_timed 0.25` (pure-Python CPU, plugins/qm-testtasks) on the
   2 children: makespan (last finished_at - first created_at), efficiency = sum of the
   worker-timed run times (finished_at - started_at) / (2 x makespan), each child's idle
   gap from the end of one task to the start of its next (the child's own time stamps),
   and the supervisor's and server's CPU, in % of one core, while both children ran.
4. The supervisor's CPU per task (500 `math` tasks via submit_many), measured without,
   twice with 2,000 extra idle processes (`sleep`) on the host, and without again; the
   idle processes are one process group, always killed afterwards (and each ends by
   itself after IDLE_SLEEP_S anyway).

Prints a markdown table of medians [lowest-highest run] next to the issue's targets, and
writes every run's numbers with `--json`. Asserts nothing about speed: the numbers depend
on the machine and on what else runs on it (see load/README.md). The exit code is 1 if a
task did not end SUCCEEDED with the right result, or a phase failed. Every wait is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pathlib
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections import Counter
from typing import Any, Callable

import grpc
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
import qm.aio  # noqa: E402
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc  # noqa: E402
from qm.client.common import TaskStatus, status_from_proto  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import Server, Worker, band_queues, delete_queues, start_server, start_worker  # noqa: E402

#: The trivial task and what it must return.
MATH_PAYLOAD = "1 + 2 * 5"
MATH_RESULT = "11"
#: Bound on any one batch of tasks reaching terminal states (a phase fails past it).
FINISH_BOUND_S = 300.0
#: Bound on one round trip.
ROUND_TRIP_BOUND_S = 30.0
#: Bound on the extra idle processes all being up.
IDLE_START_BOUND_S = 120.0
#: How long each extra idle process lives if nothing kills it (it always is killed).
IDLE_SLEEP_S = 900
PROCS = 2


# -- helpers ------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def check_math(statuses: list[TaskStatus], expected: int) -> dict[str, Any]:
    """How many tasks ended SUCCEEDED with result 11, out of how many expected."""
    states = Counter(s.state for s in statuses)
    right = sum(1 for s in statuses if s.state == "SUCCEEDED" and str(s.result) == MATH_RESULT)
    return {"expected": expected, "seen": len(statuses), "succeeded_right": right, "states": dict(states)}


def _cumulative_cpu_s(proc: psutil.Process) -> float:
    """User + system CPU of a process plus that of the children it has reaped."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_s(pid: int | None, with_root: bool = True) -> float:
    """CPU seconds of a process tree: every live descendant with what it reaped, plus what
    the root reaped (pool children that were recycled still count); with_root adds the
    root's own CPU."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.children_user + t.children_system + ((t.user + t.system) if with_root else 0.0)
        descendants = root.children(recursive=True)
    except psutil.Error:
        return 0.0
    for proc in descendants:
        try:
            total += _cumulative_cpu_s(proc)
        except psutil.Error:
            continue
    return total


def own_cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def thread_cpu_ns(pid: int) -> dict[int, int] | None:
    """CPU time of each live thread of a process, in ns, from /proc/PID/task/TID/schedstat
    (the kernel's exact run time; /proc/PID/stat counts 10 ms ticks). None where the
    kernel has no schedstat."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as stat:
                found[int(tid)] = int(stat.read().split()[0])
        except FileNotFoundError:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None  # a kernel without schedstat
            continue  # the thread ended meanwhile
        except (OSError, ValueError, IndexError):
            continue
    return found


def own_cpu_meter(pid: int) -> Callable[[], float]:
    """Start measuring one process's CPU; returns what gives the seconds used since. Thread
    by thread (a thread ending meanwhile loses only its time since the start), in ns where
    the kernel has schedstat, else psutil's ticks."""
    before = thread_cpu_ns(pid)
    if before is None:
        start_s = own_cpu_s(pid)
        return lambda: own_cpu_s(pid) - start_s

    def used_s() -> float:
        now = thread_cpu_ns(pid) or {}
        return sum(ns - before.get(tid, 0) for tid, ns in now.items()) / 1e9

    return used_s


def tree_cpu_meter(pid: int | None, with_root: bool = True) -> Callable[[], float]:
    """Start measuring a process tree's CPU (psutil: reaped children included)."""
    start_s = tree_cpu_s(pid, with_root)
    return lambda: tree_cpu_s(pid, with_root) - start_s


def worker_and_broker_meters(worker: int, broker: int | None) -> dict[str, Callable[[], Callable[[], float]]]:
    """What starts a CPU meter of a worker's supervisor, of its children and of RabbitMQ
    (0 without a broker process to see), by name."""
    return {
        "supervisor": lambda: own_cpu_meter(worker),
        "children": lambda: tree_cpu_meter(worker, with_root=False),
        "rabbitmq": lambda: tree_cpu_meter(broker),
    }


def listener_pid(port: int) -> int | None:
    """The process listening on this loopback TCP port (a broker given by URL), if visible."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except psutil.Error:
        return None
    return None


class CpuMeter:
    """CPU seconds each process of the stack used between start() and stop(); or each of
    `parts` (name: what starts a meter of it), for another system than QueueMaster's."""

    def __init__(self, stack: "Stack | None" = None,
                 parts: dict[str, Callable[[], Callable[[], float]]] | None = None) -> None:
        if parts is None:
            assert stack is not None
            server = stack.server.pid
            parts = {
                "client": lambda: own_cpu_meter(os.getpid()),
                "server": lambda: own_cpu_meter(server),
                **worker_and_broker_meters(stack.worker.pid, stack.broker_pid),
            }
        self.parts = parts
        self.used: dict[str, Callable[[], float]] = {}
        self.started = 0.0

    def start(self) -> "CpuMeter":
        self.used = {name: start() for name, start in self.parts.items()}
        self.started = time.monotonic()
        return self

    def stop(self) -> tuple[dict[str, float], float]:
        """({process: CPU seconds}, wall seconds) since start()."""
        wall_s = time.monotonic() - self.started
        return {name: used() for name, used in self.used.items()}, wall_s


# -- the stack ----------------------------------------------------------------------------


class Stack:
    """RabbitMQ (private unless a URL is given), one qm-server, one qm-worker --procs 2."""

    def __init__(self, base: pathlib.Path, broker_url: str | None, queue_name: str) -> None:
        self.base = base
        self.queue = queue_name
        self.rabbitmq = None if broker_url else LocalRabbitMQ(base / "rabbitmq")
        self.broker_url = broker_url or ""
        self.broker_pid: int | None = None
        self.server: Server
        self.worker: Worker

    def start(self) -> None:
        t0 = time.monotonic()
        if self.rabbitmq is not None:
            self.broker_url = self.rabbitmq.start()
            self.broker_pid = self.rabbitmq.process.pid if self.rabbitmq.process else None
        else:
            self.broker_pid = listener_pid(urllib.parse.urlsplit(self.broker_url).port or 5672)
        self.server = start_server(self.broker_url, self.base)
        self.worker = start_worker(self.broker_url, procs=PROCS, queues=self.queue)
        print(f"stack up in {time.monotonic() - t0:.1f} s: qm-server {self.server.address}, "
              f"qm-worker --procs {PROCS} on queue {self.queue!r}", flush=True)

    def stop(self) -> None:
        for process in (getattr(self, "worker", None), getattr(self, "server", None)):
            if process is None:
                continue
            try:
                process.stop()
            except Exception:  # keep going: everything else must stop too
                traceback.print_exc()
        if self.rabbitmq is not None:
            self.rabbitmq.stop()
        elif hasattr(self, "server"):  # a shared node: leave no queue of ours behind
            queues = [f"qm.events.{self.server.server_id}"]
            if self.queue != "default":
                queues += band_queues(self.queue)
            delete_queues(self.broker_url, queues)


def finals(client: qm.Client, ids: list[str]) -> list[TaskStatus]:
    """The terminal status of every task, over one stream."""
    return list(client.results(ids, timeout_s=FINISH_BOUND_S))


# -- 1. end to end through each way of submitting -----------------------------------------


def e2e_sequential(stack: Stack, client: qm.Client, count: int) -> dict[str, Any]:
    meter = CpuMeter(stack).start()
    latencies_ms, ids = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        ids.append(client.submit("math", MATH_PAYLOAD, queue=stack.queue))
        latencies_ms.append((time.perf_counter() - t0) * 1000.0)
    submit_s = time.monotonic() - meter.started
    statuses = finals(client, ids)
    cpu_s, wall_s = meter.stop()
    return {"tasks_per_s": count / wall_s, "submit_per_s": count / submit_s,
            "submit_ms_p50": percentile(latencies_ms, 50), "submit_ms_p99": percentile(latencies_ms, 99),
            **cpu_fields(cpu_s, count), "check": check_math(statuses, count)}


def e2e_submit_many(stack: Stack, client: qm.Client, count: int) -> dict[str, Any]:
    meter = CpuMeter(stack).start()
    ids = client.submit_many([("math", MATH_PAYLOAD)] * count, queue=stack.queue)
    statuses = finals(client, ids)
    cpu_s, wall_s = meter.stop()
    return {"tasks_per_s": count / wall_s, **cpu_fields(cpu_s, count), "check": check_math(statuses, count)}


def _e2e_aio(stack: Stack, count: int, batched: bool) -> dict[str, Any]:
    async def run() -> list[TaskStatus]:
        async with qm.aio.Client(stack.server.address) as client:
            if batched:
                ids = await client.submit_many([("math", MATH_PAYLOAD)] * count, queue=stack.queue)
            else:
                ids = await asyncio.gather(*(client.submit("math", MATH_PAYLOAD, queue=stack.queue)
                                             for _ in range(count)))
            return [s async for s in client.results(ids, timeout_s=FINISH_BOUND_S)]

    meter = CpuMeter(stack).start()
    statuses = asyncio.run(run())
    cpu_s, wall_s = meter.stop()
    return {"tasks_per_s": count / wall_s, **cpu_fields(cpu_s, count), "check": check_math(statuses, count)}


def e2e_aio_gather(stack: Stack, client: qm.Client, count: int) -> dict[str, Any]:
    return _e2e_aio(stack, count, batched=False)


def e2e_aio_submit_many(stack: Stack, client: qm.Client, count: int) -> dict[str, Any]:
    return _e2e_aio(stack, count, batched=True)


def cpu_fields(cpu_s: dict[str, float], count: int) -> dict[str, Any]:
    per_task = {name: 1000.0 * seconds / count for name, seconds in cpu_s.items()}
    return {"cpu_ms_per_task": per_task, "cpu_ms_per_task_all": sum(per_task.values()),
            "cpu_ms_per_task_without_client": sum(v for k, v in per_task.items() if k != "client")}


E2E_WAYS: dict[str, Callable[[Stack, qm.Client, int], dict[str, Any]]] = {
    "submit": e2e_sequential, "submit_many": e2e_submit_many,
    "aio_gather": e2e_aio_gather, "aio_submit_many": e2e_aio_submit_many,
}


# -- 2. round trip --------------------------------------------------------------------------


class Follower:
    """One StreamTaskResults stream, kept open; follow(id) adds an id to it, and
    wait_terminal(id) returns when that task's terminal state came back on it."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._requests: queue.Queue = queue.Queue()
        stub = task_queue_pb2_grpc.TaskQueueStub(self._channel)
        self._call = stub.StreamTaskResults(iter(self._requests.get, None))
        self._terminal: dict[str, tuple[float, TaskStatus]] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, daemon=True, name="bench-follower")
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                status = status_from_proto(response.status)
                if status.terminal:
                    with self._changed:
                        self._terminal[status.task_id] = (time.perf_counter(), status)
                        self._changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self._error = exc
        with self._changed:
            self._changed.notify_all()

    def follow(self, task_id: str) -> None:
        self._requests.put(task_queue_pb2.StreamTaskResultsRequest(task_ids=[task_id]))

    def wait_terminal(self, task_id: str, timeout_s: float) -> tuple[float, TaskStatus]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while task_id not in self._terminal:
                left = deadline - time.monotonic()
                if self._error is not None or not self._reader.is_alive():
                    raise RuntimeError(f"the results stream ended: {self._error}")
                if left <= 0:
                    raise TimeoutError(f"task {task_id} not terminal within {timeout_s} s")
                self._changed.wait(left)
            return self._terminal.pop(task_id)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join(10.0)
        self._channel.close()


#: A round trip's steps before the final state reaches the stream, each timed from the
#: submit call: the server's record made (its created_at), the submit answered, the run
#: started and ended (the worker's clock). Wall clocks of one host (CLOCK_REALTIME).
ROUND_TRIP_STEPS = ("created", "answered", "started", "finished")


def round_trip(stack: Stack, client: qm.Client, count: int) -> dict[str, Any]:
    follower = Follower(stack.server.address)
    latencies_ms, statuses = [], []
    steps_ms: dict[str, list[float]] = {step: [] for step in ROUND_TRIP_STEPS}
    try:
        for _ in range(count):
            wall0, t0 = time.time(), time.perf_counter()
            task_id = client.submit("math", MATH_PAYLOAD, queue=stack.queue)
            answered_ms = (time.perf_counter() - t0) * 1000.0
            follower.follow(task_id)
            seen_at, status = follower.wait_terminal(task_id, ROUND_TRIP_BOUND_S)
            latencies_ms.append((seen_at - t0) * 1000.0)
            statuses.append(status)
            created_s, started_s, finished_s = status.created_at, status.started_at, status.finished_at
            if created_s is not None and started_s is not None and finished_s is not None:
                at_ms = ((created_s - wall0) * 1000.0, answered_ms,
                         (started_s - wall0) * 1000.0, (finished_s - wall0) * 1000.0)
                for step, ms in zip(ROUND_TRIP_STEPS, at_ms, strict=True):
                    steps_ms[step].append(ms)
    finally:
        follower.close()
    return {"ms_p50": percentile(latencies_ms, 50), "ms_p99": percentile(latencies_ms, 99),
            "steps_ms_p50": {step: percentile(ms, 50) for step, ms in steps_ms.items() if ms},
            "check": check_math(statuses, count)}


# -- 3. CPU-bound tasks -------------------------------------------------------------------


def cpu_bound(stack: Stack, client: qm.Client, count: int, spin_s: float) -> dict[str, Any]:
    """`count` x test.spin_timed: makespan, worker-timed efficiency, each child's idle gap
    between two tasks (its own clock), and the supervisor's and server's CPU from the
    moment both children run a task until only the last PROCS tasks are left (the
    children stay busy in between)."""
    ids = client.submit_many([("test.spin_timed", str(spin_s))] * count, queue=stack.queue)
    final, window = _follow_cpu_bound(stack, client, ids)
    statuses = list(final.values())
    timed = [(s.created_at, s.started_at, s.finished_at) for s in statuses
             if s.created_at is not None and s.started_at is not None and s.finished_at is not None]
    span_s = max(finished for _, _, finished in timed) - min(created for created, _, _ in timed)
    run_s = sum(finished - started for _, started, finished in timed)
    stamps = [child_stamp(s) for s in statuses]
    gaps_ms = child_gaps_ms([stamp for stamp in stamps if stamp is not None])
    result: dict[str, Any] = {
        "makespan_s": span_s, "ideal_s": count * spin_s / PROCS, "efficiency": run_s / (PROCS * span_s),
        "child_gap_ms_p50": percentile(gaps_ms, 50), "child_gap_ms_p99": percentile(gaps_ms, 99),
        "child_gaps": len(gaps_ms),
        "check": {"expected": count, "seen": len(statuses),
                  "states": dict(Counter(s.state for s in statuses)),
                  "succeeded_right": sum(1 for stamp in stamps if stamp is not None)}}
    if window is not None and window[1] > 0:
        cpu_s, wall_s = window
        result.update({"busy_window_s": wall_s,
                       "supervisor_pct": 100.0 * cpu_s["supervisor"] / wall_s,
                       "server_pct": 100.0 * cpu_s["server"] / wall_s,
                       "supervisor_server_pct": 100.0 * (cpu_s["supervisor"] + cpu_s["server"]) / wall_s})
    return result


def _follow_cpu_bound(stack: Stack, client: qm.Client, ids: list[str]
                      ) -> tuple[dict[str, TaskStatus], tuple[dict[str, float], float] | None]:
    """Every task's final status, and the CPU used while both children were busy."""
    meter: CpuMeter | None = None
    window: tuple[dict[str, float], float] | None = None
    running: set[str] = set()
    final: dict[str, TaskStatus] = {}
    for status in client.watch(ids, timeout_s=FINISH_BOUND_S):
        if status.terminal:
            final[status.task_id] = status
            running.discard(status.task_id)
        elif status.state == "RUNNING":
            running.add(status.task_id)
        if meter is None and len(running) >= PROCS:
            meter = CpuMeter(stack).start()
        elif meter is not None and window is None and len(final) >= len(ids) - PROCS:
            window = meter.stop()
    return final, window


def child_stamp(status: TaskStatus) -> tuple[int, float, float] | None:
    """(pid, start, end) from a SUCCEEDED test.spin_timed result, else None."""
    if status.state != "SUCCEEDED":
        return None
    try:
        pid, start, end, _loops = str(status.result).split()
        return int(pid), float(start), float(end)
    except ValueError:
        return None


def child_gaps_ms(stamps: list[tuple[int, float, float]]) -> list[float]:
    """Per child (pid), the time from the end of one task to the start of its next one."""
    by_child: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in stamps:
        by_child.setdefault(pid, []).append((start, end))
    gaps = []
    for runs in by_child.values():
        runs.sort()
        gaps += [(start - previous_end) * 1000.0 for (_, previous_end), (start, _) in itertools.pairwise(runs)]
    return gaps


# -- 4. many idle processes on the host ---------------------------------------------------


class IdleProcesses:
    """`count` sleeping processes in one process group of their own, started by one shell;
    the whole group is SIGKILLed on exit, whatever happened (and each ends by itself after
    IDLE_SLEEP_S)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.shell: subprocess.Popen | None = None

    def __enter__(self) -> "IdleProcesses":
        script = f"i=0; while [ $i -lt {self.count} ]; do sleep {IDLE_SLEEP_S} & i=$((i+1)); done; wait"
        self.shell = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_all_up(self.shell)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_all_up(self, started: subprocess.Popen) -> None:
        deadline = time.monotonic() + IDLE_START_BOUND_S
        shell = psutil.Process(started.pid)
        while len(shell.children()) < self.count:
            if time.monotonic() > deadline or started.poll() is not None:
                raise RuntimeError(f"only {len(shell.children())} of {self.count} idle processes started "
                                   f"within {IDLE_START_BOUND_S} s")
            time.sleep(0.2)

    def __exit__(self, *exc_info: Any) -> None:
        if self.shell is None:
            return
        try:
            os.killpg(self.shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.shell.wait(30)
        self.shell = None


def supervisor_ms_per_task(stack: Stack, client: qm.Client, count: int) -> float:
    meter = CpuMeter(stack).start()
    ids = client.submit_many([("math", MATH_PAYLOAD)] * count, queue=stack.queue)
    statuses = finals(client, ids)
    cpu_s, _ = meter.stop()
    bad = check_math(statuses, count)
    if bad["succeeded_right"] != count:
        raise RuntimeError(f"idle-processes phase: {bad}")
    return 1000.0 * cpu_s["supervisor"] / count


def idle_processes(stack: Stack, client: qm.Client, count: int, extra: int) -> dict[str, Any]:
    """Without, with, with, without (A B B A): a load that drifts linearly on a shared
    machine falls on both sides alike."""
    before = [supervisor_ms_per_task(stack, client, count)]
    with IdleProcesses(extra):
        host = len(psutil.pids())
        during = [supervisor_ms_per_task(stack, client, count) for _ in range(2)]
    before.append(supervisor_ms_per_task(stack, client, count))
    base, idle = statistics.mean(before), statistics.mean(during)
    return {"supervisor_ms_per_task_base": base, "supervisor_ms_per_task_idle": idle,
            "change_pct": 100.0 * (idle - base) / base if base else None, "measured": [before, during],
            "host_processes": host, "check": {"expected": 4 * count, "succeeded_right": 4 * count}}


# -- driver -------------------------------------------------------------------------------


def one_run(stack: Stack, client: qm.Client, args: argparse.Namespace) -> dict[str, Any]:
    run: dict[str, Any] = {}
    phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        *((f"e2e_{name}", (lambda way=way: way(stack, client, args.tasks))) for name, way in E2E_WAYS.items()),
        ("round_trip", lambda: round_trip(stack, client, args.round_trips)),
        ("cpu_bound", lambda: cpu_bound(stack, client, args.spin_tasks, args.spin_s)),
        ("idle_processes", lambda: idle_processes(stack, client, args.idle_tasks, args.idle_procs)),
    ]
    for name, phase in phases:
        t0 = time.monotonic()
        try:
            run[name] = phase()
        except Exception as exc:  # report it and go on with the next phase
            traceback.print_exc()
            run[name] = {"error": f"{type(exc).__name__}: {exc}"}
        run[name]["wall_s"] = time.monotonic() - t0
        run[name]["load_avg_1m"] = os.getloadavg()[0]
        print(f"  {name}: {time.monotonic() - t0:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return run


#: The table: (label, where in a run, format, the issue's target). Paths are phase/key[/key].
ROWS: list[tuple[str, str, str, str]] = [
    ("sequential submit, tasks/s", "e2e_submit/submit_per_s", "{:,.0f}", ""),
    ("sequential submit latency p50, ms", "e2e_submit/submit_ms_p50", "{:.2f}", "<= 1.5"),
    ("sequential submit latency p99, ms", "e2e_submit/submit_ms_p99", "{:.2f}", ""),
    ("round trip p50, ms", "round_trip/ms_p50", "{:.2f}", "<= 2.5"),
    ("round trip p99, ms", "round_trip/ms_p99", "{:.2f}", "<= 6"),
    ("round trip p50, ms from the submit call to: record made", "round_trip/steps_ms_p50/created", "{:.2f}", ""),
    ("round trip p50, ms from the submit call to: submit answered", "round_trip/steps_ms_p50/answered", "{:.2f}", ""),
    ("round trip p50, ms from the submit call to: run started", "round_trip/steps_ms_p50/started", "{:.2f}", ""),
    ("round trip p50, ms from the submit call to: run ended", "round_trip/steps_ms_p50/finished", "{:.2f}", ""),
    ("end to end, sequential submit, tasks/s", "e2e_submit/tasks_per_s", "{:,.0f}", ">= 600"),
    ("end to end, submit_many, tasks/s", "e2e_submit_many/tasks_per_s", "{:,.0f}", ">= 2,000"),
    ("end to end, aio submit gathered, tasks/s", "e2e_aio_gather/tasks_per_s", "{:,.0f}", ">= 2,000"),
    ("end to end, aio submit_many, tasks/s", "e2e_aio_submit_many/tasks_per_s", "{:,.0f}", ">= 2,000"),
    ("CPU ms/task (sequential submit): client", "e2e_submit/cpu_ms_per_task/client", "{:.2f}", ""),
    ("CPU ms/task (sequential submit): qm-server", "e2e_submit/cpu_ms_per_task/server", "{:.2f}", ""),
    ("CPU ms/task (sequential submit): worker supervisor", "e2e_submit/cpu_ms_per_task/supervisor", "{:.2f}", ""),
    ("CPU ms/task (sequential submit): pool children", "e2e_submit/cpu_ms_per_task/children", "{:.2f}", ""),
    ("CPU ms/task (sequential submit): RabbitMQ", "e2e_submit/cpu_ms_per_task/rabbitmq", "{:.2f}", ""),
    ("CPU ms/task (sequential submit): all but the client", "e2e_submit/cpu_ms_per_task_without_client",
     "{:.2f}", "<= 1.5"),
    ("CPU ms/task (sequential submit): all", "e2e_submit/cpu_ms_per_task_all", "{:.2f}", ""),
    ("CPU ms/task (submit_many): all but the client", "e2e_submit_many/cpu_ms_per_task_without_client",
     "{:.2f}", "<= 1.5"),
    ("CPU ms/task (aio submit_many): all but the client", "e2e_aio_submit_many/cpu_ms_per_task_without_client",
     "{:.2f}", "<= 1.5"),
    ("CPU-bound: makespan, s", "cpu_bound/makespan_s", "{:.2f}", ""),
    ("CPU-bound: efficiency (worker-timed)", "cpu_bound/efficiency", "{:.3f}", ">= 0.97"),
    ("CPU-bound: a child's idle gap between two tasks p50, ms", "cpu_bound/child_gap_ms_p50", "{:.2f}", "< 1"),
    ("CPU-bound: a child's idle gap between two tasks p99, ms", "cpu_bound/child_gap_ms_p99", "{:.2f}", ""),
    ("CPU-bound: supervisor + server CPU, % of a core", "cpu_bound/supervisor_server_pct", "{:.1f}", "<= 3"),
    ("CPU-bound: supervisor CPU, % of a core", "cpu_bound/supervisor_pct", "{:.1f}", ""),
    ("CPU-bound: server CPU, % of a core", "cpu_bound/server_pct", "{:.1f}", ""),
    ("supervisor CPU ms/task (submit_many)", "idle_processes/supervisor_ms_per_task_base", "{:.2f}", ""),
    ("supervisor CPU ms/task, with the extra idle processes", "idle_processes/supervisor_ms_per_task_idle",
     "{:.2f}", ""),
    ("... change with the extra idle processes, %", "idle_processes/change_pct", "{:+.0f}", "<= +10"),
]


def lookup(run: dict[str, Any], path: str) -> float | None:
    value: Any = run
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per row label: the median, lowest and highest over the runs."""
    summary = {}
    for label, path, _fmt, _target in ROWS:
        values = [v for v in (lookup(run, path) for run in runs) if v is not None]
        summary[label] = {"median": statistics.median(values) if values else None,
                          "min": min(values, default=None), "max": max(values, default=None)}
    return summary


def markdown_table(summary: dict[str, dict[str, float | None]], args: argparse.Namespace) -> str:
    heading = f"median of {args.runs} runs [lowest to highest]" if args.runs > 1 else "one run"
    lines = [f"| measure | {heading} | target (issue 9) |", "|---|---|---|"]
    for label, _path, fmt, target in ROWS:
        x = summary[label]
        if x["median"] is None:
            cell = "n/a"
        elif args.runs > 1:
            cell = f"{_shown(fmt, x['median'])} [{_shown(fmt, x['min'])} to {_shown(fmt, x['max'])}]"
        else:
            cell = _shown(fmt, x["median"])
        lines.append(f"| {label} | {cell} | {target} |")
    return "\n".join(lines)


def _shown(fmt: str, value: float | None) -> str:
    return fmt.format(round(value or 0.0, 9) + 0.0)  # + 0.0: never "-0"


def failures(runs: list[dict[str, Any]]) -> list[str]:
    """Every phase that raised or whose tasks did not all end as they should."""
    found = []
    for number, run in enumerate(runs, 1):
        for name, phase in run.items():
            check = phase.get("check")
            if "error" in phase:
                found.append(f"run {number} {name}: {phase['error']}")
            elif check is None or check["succeeded_right"] != check["expected"]:
                found.append(f"run {number} {name}: {check}")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of every phase; medians are shown (3)")
    parser.add_argument("--tasks", type=int, default=5000, help="math tasks per way of submitting (5000)")
    parser.add_argument("--round-trips", type=int, default=300, help="sequential round trips (300)")
    parser.add_argument("--spin-tasks", type=int, default=24, help="CPU-bound test.spin tasks (24)")
    parser.add_argument("--spin-s", type=float, default=0.25, help="seconds each CPU-bound task spins (0.25)")
    parser.add_argument("--idle-procs", type=int, default=2000, help="extra idle processes on the host (2000)")
    parser.add_argument("--idle-tasks", type=int, default=500,
                        help="math tasks per supervisor measurement; 2 without, 2 with them (500)")
    parser.add_argument("--quick", action="store_true",
                        help="correctness smoke: 1 run, 30 tasks, 10 round trips, 4 x 0.05 s spins, "
                             "20 idle processes, 20 tasks")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--queue", default="default", help="logical queue for the tasks (default)")
    parser.add_argument("--json", metavar="PATH", help="also write every run's numbers as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.tasks, args.round_trips = 1, 30, 10
        args.spin_tasks, args.spin_s, args.idle_procs, args.idle_tasks = 4, 0.2, 20, 20
    return args


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in
                  pathlib.Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "memory_mib": psutil.virtual_memory().total // (1024 * 1024)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "runs": [], "load_avg_1m": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qm-bench-dispatch-") as tmp:
        stack = Stack(pathlib.Path(tmp), args.broker_url, args.queue)
        try:
            stack.start()
            with qm.Client(stack.server.address) as client:
                client.result(client.submit("math", MATH_PAYLOAD, queue=stack.queue), timeout_s=60)  # warm-up
                for number in range(1, args.runs + 1):
                    print(f"run {number} of {args.runs}", flush=True)
                    report["runs"].append(one_run(stack, client, args))
                    report["load_avg_1m"].append(os.getloadavg()[0])
        finally:
            stack.stop()
    report["summary"] = summarize(report["runs"])
    report["wall_s"] = time.monotonic() - started
    report["failures"] = failures(report["runs"])
    report["table"] = markdown_table(report["summary"], args)
    print()
    print(report["table"])
    loads = ", ".join(f"{v:.1f}" for v in report["load_avg_1m"])
    print(f"\n{report['machine']['nproc']} x {report['machine']['cpu_model']}; load average (1 min) "
          f"after each run: {loads}; total {report['wall_s']:.0f} s")
    hosts = [run["idle_processes"].get("host_processes") for run in report["runs"]]
    print(f"extra idle processes: {args.idle_procs:,} (processes on the host with them: "
          f"{', '.join(str(h) for h in hosts)})")
    return finish(report, args.json)


def finish(report: dict[str, Any], json_path: str | None) -> int:
    """Print the report's failures, write it as JSON if asked: the exit code (1: a failure)."""
    for failure in report["failures"]:
        print(f"FAILED: {failure}")
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
