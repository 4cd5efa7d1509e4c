"""What every fault scenario shares: a mixed workload with known answers, a watch stream
counting terminal updates per task, the executions the workers logged, the worker status
endpoint, and one check-and-report step.

A scenario submits a few hundred tasks (quick test.echo / math, ~15% one-second
test.sleep), injects its fault, waits (always bounded) and then checks, for every task
that was accepted (an id came back):

* exactly one terminal update reached the watch stream, and the store agrees with it;
* the final state is the expected one (the spec's, SUCCEEDED unless it or the scenario
  says otherwise) and the result is right: echo returns its payload (a unique token), math
  its value, sleep its payload (a spec may give a pattern instead of an exact result);
* no worker executed a task id that was never accepted (no task was enqueued twice).

and prints the counts: accepted, succeeded, retried (attempts > 1), and duplicates
executed (the same attempt of a task completed more than once, from the workers' logs
"task <id> (<type>) attempt N: <STATE>").
"""
from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
import uuid
from typing import Any, Iterable

import grpc
import pika

import qm
from qm._proto.qm.v1 import worker_status_pb2, worker_status_pb2_grpc
from qm.client.client import RemoteError, TaskStatus
from tests.processes import START_TIMEOUT_S, WORKER_READY, Launcher, Process, ProcessExited, Worker, command, unique

#: Bound on every accepted task of a scenario reaching a terminal state after the fault.
SETTLE_TIMEOUT_S = 150.0
#: ... and on them making progress: no task finishing for this long means one is stuck.
STALL_TIMEOUT_S = 30.0
#: Deadline of a call to a worker's status endpoint.
STATUS_CALL_TIMEOUT_S = 10.0
#: Log lines shown per process in an assertion message.
LOG_TAIL_LINES = 80
#: Pause before a resuming watcher dials its server again (it is down, or restarting).
RESUME_DELAY_S = 0.2

WORKER_STATUS_LINE = re.compile(r"worker status and health on \S+ \(port (?P<port>\d+)\)")
EXECUTION_LINE = re.compile(
    r"task (?P<id>[0-9a-f-]{36}) \((?P<type>[^)]+)\) attempt (?P<attempt>\d+): (?P<state>[A-Z_]+)")


# -- workload ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """One task to submit and what it must end with: its terminal state and, when that is
    SUCCEEDED, its result (exact, or a pattern the whole result must match)."""

    type: str
    payload: str
    expected: str | re.Pattern | None  # None: the result is not checked (it must not succeed)
    key: str  # idempotency key: unique per spec
    state: str = "SUCCEEDED"
    kind: str = ""  # a label to count by (see counts_by_kind)
    options: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # submit options

    @property
    def slow(self) -> bool:
        return self.type == "test.sleep"

    def result_ok(self, result: Any) -> bool:
        if isinstance(self.expected, re.Pattern):
            return isinstance(result, str) and self.expected.fullmatch(result) is not None
        return result == self.expected


def mixed_workload(count: int, sleep_every: int = 7, sleep_s: str = "1") -> list[Spec]:
    """`count` specs: every `sleep_every`-th a test.sleep of `sleep_s`, the others
    alternately test.echo (a unique token) and math (a distinct value)."""
    run = uuid.uuid4().hex[:8]
    specs = []
    for i in range(count):
        key = f"{run}-{i}"
        if i % sleep_every == sleep_every // 2:
            specs.append(Spec("test.sleep", sleep_s, sleep_s, key))
        elif i % 2:
            token = f"echo-{key}-{uuid.uuid4().hex[:6]}"
            specs.append(Spec("test.echo", token, token, key))
        else:
            specs.append(Spec("math", f"{i} * 3 + 1", str(i * 3 + 1), key))
    return specs


def submit_all(client: qm.Client, specs: Iterable[Spec], queue: str, **options) -> dict[str, Spec]:
    """Submit each spec (with its idempotency key, `options` overridden by its own);
    task id → spec, in submission order."""
    return {client.submit(spec.type, spec.payload, queue=queue, idempotency_key=spec.key,
                          **{**options, **spec.options}): spec
            for spec in specs}


# -- observing -----------------------------------------------------------------------

class Watcher:
    """One watch stream over many tasks, read by a background thread: every update per id.

    With `resume`, a stream cut off by its server going away (UNAVAILABLE: killed,
    restarting) is opened again, within `timeout_s` in all, for the tasks not yet seen
    terminal; the server sends each one's current record first, so a task that ended
    meanwhile still shows exactly one terminal update.
    """

    def __init__(self, address: str, task_ids: Iterable[str], timeout_s: float = SETTLE_TIMEOUT_S,
                 resume: bool = False) -> None:
        self.task_ids = list(task_ids)
        self.updates: dict[str, list[TaskStatus]] = collections.defaultdict(list)
        self.error: BaseException | None = None
        self.resume = resume
        self.resumed = 0  # streams opened again after their server went away
        self._closed = False
        self._lock = threading.Lock()
        self._client = qm.Client(address)
        self._thread = threading.Thread(target=self._run, args=(timeout_s,), daemon=True, name="watcher")
        self._thread.start()

    def _run(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                pending = self._not_terminal()
                if not pending:
                    return
                try:
                    left_s = max(0.1, deadline - time.monotonic())
                    for status in self._client.watch(pending, timeout_s=left_s):
                        with self._lock:
                            self.updates[status.task_id].append(status)
                    if not self.resume:
                        return
                    time.sleep(RESUME_DELAY_S)  # ended early (a server stopping): follow the rest again
                except RemoteError as exc:
                    if not (self.resume and exc.code is grpc.StatusCode.UNAVAILABLE and not self._closed
                            and time.monotonic() + RESUME_DELAY_S < deadline):
                        raise
                    self.resumed += 1
                    time.sleep(RESUME_DELAY_S)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _not_terminal(self) -> list[str]:
        with self._lock:
            return [task_id for task_id in self.task_ids
                    if not any(s.terminal for s in self.updates.get(task_id, []))]

    def terminal_count(self) -> int:
        with self._lock:
            return sum(1 for seen in self.updates.values() if any(s.terminal for s in seen))

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._client.close()

    def close(self) -> None:
        self._closed = True
        self._client.close()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def last_state(self, task_id: str) -> str:
        """The state of the task's latest update on the stream ("none" before the first)."""
        with self._lock:
            updates = self.updates.get(task_id)
            return updates[-1].state if updates else "none"

    def seen(self, task_id: str, states: Iterable[str]) -> bool:
        """Whether any update of the task on the stream was in one of `states`."""
        states = set(states)
        with self._lock:
            return any(status.state in states for status in self.updates.get(task_id, []))

    def terminal_updates(self) -> dict[str, list[TaskStatus]]:
        with self._lock:
            return {task_id: [s for s in self.updates.get(task_id, []) if s.terminal] for task_id in self.task_ids}


def statuses(client: qm.Client, task_ids: Iterable[str]) -> dict[str, TaskStatus]:
    return {task_id: client.status(task_id) for task_id in task_ids}


@dataclasses.dataclass(frozen=True)
class Execution:
    task_id: str
    type: str
    attempt: int
    state: str
    worker: str


def queue_depth(broker_url: str, queue: str) -> int:
    """Messages ready in a logical queue's AMQP queue (not counting unacked ones)."""
    params = pika.URLParameters(broker_url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    with pika.BlockingConnection(params) as connection:
        return connection.channel().queue_declare(f"qm.tasks.{queue}", passive=True).method.message_count


def executions(processes: Iterable[Process]) -> list[Execution]:
    """Every completed execution the workers logged (a worker killed mid-task logs none)."""
    found = []
    for process in processes:
        for match in EXECUTION_LINE.finditer(process.stderr):
            found.append(Execution(match["id"], match["type"], int(match["attempt"]), match["state"],
                                   process.name))
    return found


def counts_by_kind(accepted: dict[str, Spec], final: dict[str, TaskStatus], workers: Iterable[Process],
                   marked: dict[str, set[str]] | None = None) -> dict[str, dict[str, int]]:
    """Per spec kind: accepted; expected (its state reached, with the right result);
    open (not terminal: lost or stuck); wrong (another terminal state, or a wrong result);
    retried (attempts > 1); duplicates (an attempt completed more than once, per the
    workers' logs); and per name in `marked`, how many of the kind are in that set of ids
    (e.g. the tasks waiting for a retry when a fault hit)."""
    per_attempt = collections.Counter((run.task_id, run.attempt) for run in executions(workers))
    duplicated = {task_id for (task_id, _attempt), count in per_attempt.items() if count > 1}
    table: dict[str, dict[str, int]] = {}
    for task_id, spec in accepted.items():
        row = table.setdefault(spec.kind or spec.type, dict.fromkeys(
            ("accepted", "expected", "open", "wrong", "retried", "duplicates"), 0))
        status = final[task_id]
        row["accepted"] += 1
        if not status.terminal:
            row["open"] += 1
        elif status.state == spec.state and (status.state != "SUCCEEDED" or spec.result_ok(status.result)):
            row["expected"] += 1
        else:
            row["wrong"] += 1
        row["retried"] += status.attempts > 1
        row["duplicates"] += task_id in duplicated
        for column, ids in (marked or {}).items():
            row[column] = row.get(column, 0) + (task_id in ids)
    return table


def print_kinds(name: str, table: dict[str, dict[str, int]]) -> None:
    """One "[faults]" line per kind (tests/faults/conftest.py shows them in the summary)."""
    for kind, row in table.items():
        print(f"[faults] {name}: kind {kind}: " + ", ".join(f"{key}={value}" for key, value in row.items()),
              flush=True)


def wait_dead_letters(client: qm.Client, task_ids: Iterable[str], timeout_s: float) -> set[str]:
    """The ids of every dead letter listed, once the given tasks are all among them or
    `timeout_s` passed: a worker publishes the dead letter before the final event, but the
    server takes the two from different queues, so the listing may trail the state."""
    wanted = set(task_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        letters, _total = client.dead_letters(limit=1_000_000)
        listed = {letter.task_id for letter in letters}
        if wanted <= listed or time.monotonic() >= deadline:
            return listed
        time.sleep(0.2)


def tail(process: Process, lines: int = LOG_TAIL_LINES) -> str:
    text = process.stderr.splitlines()
    return (f"--- {process.name} (pid {process.pid}, alive={process.alive()}) last {lines} of "
            f"{len(text)} stderr lines ---\n" + "\n".join(text[-lines:]))


def tails(processes: Iterable[Process], lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(tail(process, lines) for process in processes)


# -- worker status endpoint ----------------------------------------------------------

class StatusProbe:
    """A channel to one worker's qm.v1.WorkerStatus endpoint (its port is in its log)."""

    def __init__(self, worker: Worker) -> None:
        port = worker.wait_for_line(WORKER_STATUS_LINE, 30.0).group("port")
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._stub = worker_status_pb2_grpc.WorkerStatusStub(self._channel)

    def get(self) -> worker_status_pb2.GetWorkerStatusResponse:
        return self._stub.GetWorkerStatus(worker_status_pb2.GetWorkerStatusRequest(),
                                          timeout=STATUS_CALL_TIMEOUT_S)

    def busy(self) -> list[tuple[int, str, str, float]]:
        """(pid, task id, type, seconds running) of each child running a task now."""
        now = time.time()
        return [(child.pid, child.task_id, child.type, now - child.running_since.ToNanoseconds() / 1e9)
                for child in self.get().children if child.task_id]

    def close(self) -> None:
        self._channel.close()


# -- starting workers that may die at once ------------------------------------------

def spawn_worker(launcher: Launcher, broker_url: str, queue: str, procs: int = 2,
                 env: dict[str, str] | None = None, timeout_s: float = START_TIMEOUT_S) -> Worker:
    """Start a qm-worker (as tests.processes.start_worker does) that may be killed before
    it logs "consuming" (a poison task can reach it first): wait for that line or its end.
    The launcher stops it in teardown and its logs stay readable either way."""
    worker_id = unique("worker")
    args = [command("qm-worker"), "--procs", str(procs), "--broker-url", broker_url, "--queues", queue,
            "--worker-id", worker_id]
    if launcher.worker_log_level:
        args += ["--log-level", launcher.worker_log_level]
    worker = Worker(args, worker_id, [queue], env)
    launcher.started.append(worker)
    try:
        worker.wait_for_line(WORKER_READY, timeout_s)
    except ProcessExited:
        pass
    return worker


# -- the common check ----------------------------------------------------------------

class TasksNotFinished(AssertionError):
    """Some accepted tasks did not reach a terminal state in time (or stopped progressing)."""

    def __init__(self, message: str, open_ids: list[str], last_state: dict[str, str]) -> None:
        super().__init__(message)
        self.open_ids = open_ids
        self.last_state = last_state


def wait_settled(watcher: Watcher | list[Watcher], timeout_s: float, processes: Iterable[Process],
                 stall_s: float = STALL_TIMEOUT_S) -> None:
    """Wait (bounded) until the watch stream(s) ended, i.e. every task reached a terminal
    state; give up early when no task finished for `stall_s` (something is stuck)."""
    watchers = watcher if isinstance(watcher, list) else [watcher]
    deadline = time.monotonic() + timeout_s
    done, progress_at = -1, time.monotonic()
    while pending := [one for one in watchers if not one.finished]:
        now = time.monotonic()
        if now >= deadline or now - progress_at >= stall_s:
            break
        count = sum(one.terminal_count() for one in watchers)
        if count != done:
            done, progress_at = count, now
        # Read once: a watcher may finish between two looks (then the join returns at once).
        pending[0].join(0.5)
    for one in watchers:
        one.join(0.0)  # closes the client of a finished one
    errors = [one.error for one in watchers if one.finished and one.error is not None]
    if errors or not all(one.finished for one in watchers):
        why = (f"stream error: {errors[0]!r}" if errors else
               f"none finished in the last {stall_s} s" if time.monotonic() < deadline else f"{timeout_s} s passed")
        last: dict[str, str] = {}
        for one in watchers:
            one.close()  # ends the stream
            last.update((task_id, one.last_state(task_id)) for task_id, seen in one.terminal_updates().items()
                        if not seen)
        total = sum(len(one.task_ids) for one in watchers)
        raise TasksNotFinished(
            f"{len(last)} of {total} accepted tasks did not reach a terminal state "
            f"({why}); first ones and their last streamed state: {dict(list(last.items())[:20])}\n"
            f"{tails(processes)}", list(last), last)


#: What tasks left RETRYING with their next attempt long past mean (issue #15).
RETRY_LOST = (
    "tasks waiting for a retry in a delay tier when RabbitMQ went down were dropped: they stay "
    "RETRYING with their next attempt long past, and nothing brings them back (the delay tiers "
    "dead-letter expired messages to the work queue at most once; one expiring while the work "
    "queue is unavailable, node stopping or booting, is lost)")


class RetryLost(AssertionError):
    """Accepted tasks stayed RETRYING long after their next attempt was due."""


def unfinished(name: str, accepted: dict[str, Spec], final: dict[str, TaskStatus], workers: Iterable[Process],
               stuck: TasksNotFinished, marked: dict[str, set[str]] | None = None) -> AssertionError:
    """After wait_settled gave up: print the per-kind counts and the lost tasks, and
    return the error to raise, naming the likely cause (RetryLost when every task left
    open is RETRYING past its next attempt)."""
    print_kinds(name, counts_by_kind(accepted, final, workers, marked))
    now = time.time()
    overdue = {task_id: now - final[task_id].next_attempt_at for task_id in stuck.open_ids
               if final[task_id].state == "RETRYING" and final[task_id].next_attempt_at
               and final[task_id].next_attempt_at < now}
    print(f"[faults] {name}: accepted={len(accepted)}, not_terminal={len(stuck.open_ids)}, "
          f"stuck_RETRYING_past_next_attempt={len(overdue)}, by state "
          f"{dict(collections.Counter(final[task_id].state for task_id in stuck.open_ids))}"
          + "".join(f", of them {column}={len(set(stuck.open_ids) & ids)}"
                    for column, ids in (marked or {}).items()), flush=True)
    lines = [f"  {task_id} {accepted[task_id].kind or accepted[task_id].type}: {final[task_id].state}, "
             f"attempts {final[task_id].attempts}"
             + (f", next attempt {overdue[task_id]:.0f} s past" if task_id in overdue else "")
             for task_id in stuck.open_ids[:30]]
    error = RetryLost if overdue and len(overdue) == len(stuck.open_ids) else AssertionError
    return error(f"{name}: {len(stuck.open_ids)} of {len(accepted)} accepted tasks never ended, "
                 f"{len(overdue)} of them RETRYING past their next attempt"
                 + (f": {RETRY_LOST}" if overdue else "") + "\n" + "\n".join(lines) + f"\n{stuck}")


def check_and_report(name: str, accepted: dict[str, Spec], watcher: Watcher | list[Watcher],
                     final: dict[str, TaskStatus],
                     workers: Iterable[Process], *, expected_state: dict[str, str | set[str]] | None = None,
                     logs_of: Iterable[Process] = (), extra: dict[str, object] | None = None) -> dict[str, object]:
    """Assert the common invariants (module docstring) and print the counts; returns them.

    `expected_state` overrides the spec's state for some task ids: a state, or a set of
    states allowed (a SUCCEEDED one has its result checked all the same).
    """
    workers = list(workers)
    everyone = list(dict.fromkeys([*workers, *logs_of]))
    expected_state = expected_state or {}
    problems: list[str] = []

    terminal: dict[str, list[TaskStatus]] = {}
    for one in (watcher if isinstance(watcher, list) else [watcher]):
        terminal.update(one.terminal_updates())
    for task_id in accepted:
        seen = terminal.get(task_id, [])
        if len(seen) != 1:
            problems.append(f"task {task_id}: {len(seen)} terminal updates on the watch stream "
                            f"({[s.state for s in seen]})")
        elif seen[0].state != final[task_id].state:
            problems.append(f"task {task_id}: streamed {seen[0].state} but the store says {final[task_id].state}")

    for task_id, spec in accepted.items():
        status = final[task_id]
        want = expected_state.get(task_id, spec.state)
        allowed = {want} if isinstance(want, str) else set(want)
        if status.state not in allowed:
            problems.append(f"task {task_id} ({spec.type} {spec.payload!r}): {status.state} "
                            f"(attempts {status.attempts}, worker {status.worker}): {status.error}; "
                            f"expected {' or '.join(sorted(allowed))}")
        elif status.state == "SUCCEEDED" and not spec.result_ok(status.result):
            problems.append(f"task {task_id} ({spec.type} {spec.payload!r}): result {status.result!r}, "
                            f"expected {spec.expected!r}")

    runs = executions(workers)
    per_attempt = collections.Counter((run.task_id, run.attempt) for run in runs)
    duplicated = sorted({task_id for (task_id, _attempt), count in per_attempt.items() if count > 1})
    strangers = sorted({run.task_id for run in runs} - set(accepted))
    if strangers:
        problems.append(f"workers executed {len(strangers)} task id(s) that were never accepted "
                        f"(enqueued twice?): {strangers[:10]}")

    counts: dict[str, object] = {
        "accepted": len(accepted),
        "succeeded": sum(1 for status in final.values() if status.state == "SUCCEEDED"),
        "other_terminal": dict(collections.Counter(s.state for s in final.values() if s.state != "SUCCEEDED")),
        "retried(attempts>1)": sum(1 for status in final.values() if status.attempts > 1),
        "executions_logged": len(runs),
        "duplicates_executed": len(duplicated),
        **(extra or {}),
    }
    print(f"\n[faults] {name}: " + ", ".join(f"{key}={value}" for key, value in counts.items()), flush=True)
    if duplicated:
        print(f"[faults] {name}: tasks executed more than once (same attempt): {duplicated[:20]}", flush=True)
    if problems:
        raise AssertionError(f"{name}: {len(problems)} problem(s):\n" + "\n".join(problems[:40]) +
                             f"\ncounts: {counts}\n{tails(everyone)}")
    return counts
