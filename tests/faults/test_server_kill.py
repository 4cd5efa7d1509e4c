"""Scenario 3: kill -9 of qm-server while clients submit; restarted with the same
--server-id, --data-dir and port. Clients retrying with their idempotency keys lose
nothing and create no duplicates (one task id per key, nothing enqueued twice), and the
statuses published while the server was down are caught up from its durable events queue.

A server killed between storing a task and RabbitMQ's confirm of its message used to
leave a stored QUEUED task that never ran, while the client's retry (same key) was
answered with its id (SUBMISSION_LOST). The store now keeps the message until confirmed and
the restarted server publishes it again; these tests guard that.
"""
from __future__ import annotations

import collections
import sqlite3
import threading
import time
import uuid

import pytest

import qm
from qm.client.client import RemoteError
from tests.faults.proxy import HoldingProxy
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
    TasksNotFinished,
    Watcher,
    check_and_report,
    executions,
    mixed_workload,
    queue_depth,
    statuses,
    tails,
    wait_settled,
)
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

TASKS = 240
SUBMITTERS = 4
#: Accepted submissions before the kill.
KILL_AFTER = 60
#: How long the server stays down (workers go on publishing events meanwhile).
DOWN_S = 2.0
#: How long a client keeps retrying UNAVAILABLE with the same key.
SUBMIT_RETRY_S = 60.0
#: Bound on the submitter threads finishing.
SUBMIT_TIMEOUT_S = 120.0
#: Bound on a single task finishing once its server is back.
RESULT_TIMEOUT_S = 20.0
#: How long a submit whose publish is held back must stay unanswered.
UNANSWERED_S = 2.0

SUBMISSION_LOST = (
    "qm-server killed between storing a submitted task and its publish leaving the "
    "process (TaskService._enqueue: store.insert commits, broker.publish only buffers in pika "
    "until the next loop turn): the restarted server answers the client's retry (same "
    "idempotency key) with the stored QUEUED record, whose message never reached RabbitMQ, "
    "so an accepted task never runs")


class SubmissionLost(AssertionError):
    """An accepted task stays QUEUED for good: its message never reached RabbitMQ."""


def store_rows(server) -> dict[str, tuple]:
    """task id → (idempotency key, state number, attempts) in a server's SQLite store."""
    path = server.data_dir / f"{server.server_id}.sqlite3"
    store = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {row[0]: row[1:] for row in
                store.execute("SELECT task_id, idempotency_key, state, attempts FROM tasks").fetchall()}
    finally:
        store.close()


class Submitters:
    """Threads, each with its own client, submitting their share of the specs; each
    submission retries UNAVAILABLE under its idempotency key (Client(submit_retry_s))."""

    def __init__(self, address: str, queue: str, specs) -> None:
        self.queue = queue
        self.accepted: dict[str, list[str]] = collections.defaultdict(list)  # key → ids returned
        self.spans: dict[str, tuple[float, float]] = {}                       # key → submit start, end
        self.errors: list[tuple[str, RemoteError]] = []
        self._lock = threading.Lock()
        shares = [specs[i::SUBMITTERS] for i in range(SUBMITTERS)]
        self._threads = [threading.Thread(target=self._run, args=(address, share), daemon=True)
                         for share in shares]
        for thread in self._threads:
            thread.start()

    def _run(self, address: str, share) -> None:
        with qm.Client(address, submit_retry_s=SUBMIT_RETRY_S) as client:
            for spec in share:
                start = time.monotonic()
                try:
                    task_id = client.submit(spec.type, spec.payload, queue=self.queue, idempotency_key=spec.key)
                except RemoteError as exc:
                    with self._lock:
                        self.errors.append((spec.key, exc))
                    continue
                with self._lock:
                    self.accepted[spec.key].append(task_id)
                    self.spans[spec.key] = (start, time.monotonic())

    def count(self) -> int:
        with self._lock:
            return sum(len(ids) for ids in self.accepted.values())

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self._threads), "a submitter is still retrying"


def test_kill_9_of_the_server_during_submissions(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    specs = mixed_workload(TASKS)
    by_key = {spec.key: spec for spec in specs}

    submitters = Submitters(server.address, queue, specs)
    wait_until(lambda: submitters.count() >= KILL_AFTER, SUBMIT_TIMEOUT_S, interval_s=0.01,
               message=f"{KILL_AFTER} submissions accepted")
    server.kill()
    killed_at = time.monotonic()
    accepted_before_kill = submitters.count()
    time.sleep(DOWN_S)
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])
    restarted_at = time.time()
    assert restarted.port == server.port and restarted.data_dir == server.data_dir
    submitters.join(SUBMIT_TIMEOUT_S)
    processes = [worker, server, restarted]
    assert not submitters.errors, f"{submitters.errors[:5]}\n{tails(processes)}"

    # One task id per idempotency key, every key accepted.
    assert set(submitters.accepted) == set(by_key)
    ids_per_key = {key: set(ids) for key, ids in submitters.accepted.items()}
    assert all(len(ids) == 1 for ids in ids_per_key.values()), \
        {key: ids for key, ids in ids_per_key.items() if len(ids) != 1}
    accepted = {next(iter(ids)): by_key[key] for key, ids in ids_per_key.items()}
    assert len(accepted) == len(by_key), "two keys got the same task id"
    spanning_kill = {task_id for task_id, spec in accepted.items() if submitters.spans[spec.key][0] < killed_at
                     < submitters.spans[spec.key][1]}

    with qm.Client(restarted.address) as client:
        watcher = Watcher(restarted.address, accepted)
        try:
            wait_settled(watcher, SETTLE_TIMEOUT_S, processes)
        except TasksNotFinished as stuck:
            rows = store_rows(restarted)
            ran = {run.task_id for run in executions([worker])}
            depth = queue_depth(rabbitmq.url, queue)
            evidence = {task_id: {"key": accepted[task_id].key,
                                  "store(state,attempts)": rows.get(task_id, (None,) * 3)[1:],
                                  "submit_spanned_kill": task_id in spanning_kill, "executed": task_id in ran}
                        for task_id in stuck.open_ids}
            print(f"\n[faults] server kill -9: STUCK tasks {evidence}; work queue ready={depth}; "
                  f"submits spanning the kill: {len(spanning_kill)}", flush=True)
            if depth == 0 and all(stuck.last_state[task_id] == "QUEUED" and task_id in spanning_kill
                                  and task_id not in ran for task_id in stuck.open_ids):
                raise SubmissionLost(f"{SUBMISSION_LOST}\nevidence: {evidence}; work queue "
                                     f"qm.tasks.{queue} holds {depth} ready messages\n{stuck}") from None
            raise
        final = statuses(client, accepted)

    # The restarted server's store: exactly one row per key and no row it learnt only
    # from an event (a task enqueued without the store knowing it).
    rows = store_rows(restarted)
    rows_per_key = collections.Counter(key for key, _state, _attempts in rows.values())
    assert {key: n for key, n in rows_per_key.items() if n != 1 or key not in by_key} == {}, \
        "store rows per idempotency key (expected exactly one per submitted key)"
    assert set(rows) == set(accepted)

    check_and_report("server kill -9", accepted, watcher, final, [worker], logs_of=[server, restarted], extra={
        "accepted_before_kill": accepted_before_kill, "submits_spanning_kill": len(spanning_kill),
        "finished_before_restart": sum(1 for s in final.values() if s.finished_at and s.finished_at < restarted_at)})


@pytest.fixture
def holding_proxy(rabbitmq):
    """A proxy to the shared node; it outlives the launcher's teardown (queue deletion)."""
    proxy = HoldingProxy(rabbitmq.amqp_port)
    yield proxy
    proxy.close()


def test_a_submission_cut_off_before_its_publish_reached_rabbitmq_is_not_lost(rabbitmq, holding_proxy, launcher):
    """The window of the bug above made reproducible: the server's connection to RabbitMQ
    goes through a proxy that holds back what the server sends, so its publish is
    written but never arrives; the server is killed after it stored the task."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(holding_proxy.url())
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    with qm.Client(server.address) as client:  # the work queue is declared, the path works
        warm = client.submit("test.echo", "warm", queue=queue)
        assert client.result(warm, timeout_s=RESULT_TIMEOUT_S) == "warm", tails([worker, server])

    holding_proxy.hold()
    key, token = f"cut-off-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    answer: dict[str, object] = {}

    def submit() -> None:
        try:
            with qm.Client(server.address, submit_retry_s=SUBMIT_RETRY_S) as retrying:
                answer["id"] = retrying.submit("test.echo", token, queue=queue, idempotency_key=key)
        except BaseException as exc:
            answer["error"] = exc

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    # The server stored the task and wrote its publish (held back by the proxy).
    wait_until(lambda: any(row[0] == key for row in store_rows(server).values()) and holding_proxy.held_bytes(),
               RESULT_TIMEOUT_S, message="the task stored and its publish written")
    # OK only after RabbitMQ has the task: with the publish held back no confirm can come,
    # so the submit stays unanswered. An answer not waiting for the confirm would come
    # within milliseconds of the publish; UNANSWERED_S gives it far more than that.
    submitter.join(UNANSWERED_S)
    assert submitter.is_alive() and not answer, \
        f"the submit was answered before RabbitMQ had the task: {answer}\n{tails([worker, server])}"
    server.kill()
    holding_proxy.drop()
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])
    submitter.join(SUBMIT_TIMEOUT_S)
    processes = [worker, server, restarted]
    assert "id" in answer, f"the submit did not succeed: {answer}\n{tails(processes)}"
    task_id = answer["id"]

    with qm.Client(restarted.address) as client:
        try:
            final = next(s for s in client.watch([task_id], timeout_s=RESULT_TIMEOUT_S) if s.terminal)
        except TimeoutError:
            status = client.status(task_id)
            depth = queue_depth(rabbitmq.url, queue)
            ran = task_id in {run.task_id for run in executions([worker])}
            raise SubmissionLost(
                f"{SUBMISSION_LOST}\naccepted task {task_id} (key {key}) is still {status.state} "
                f"(attempts {status.attempts}) after {RESULT_TIMEOUT_S} s; worker executed it: {ran}; "
                f"work queue qm.tasks.{queue} holds {depth} ready messages\n{tails(processes)}") from None
    assert (final.state, final.result) == ("SUCCEEDED", token), (final, tails(processes))


def unconfirmed_rows(server) -> set[str]:
    """Task ids in a server's `unconfirmed` table (its publish not yet marked confirmed)."""
    path = server.data_dir / f"{server.server_id}.sqlite3"
    store = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {task_id for (task_id,) in store.execute("SELECT task_id FROM unconfirmed")}
    finally:
        store.close()


def test_kill_9_right_after_submits_whose_confirm_marks_were_not_yet_written(rabbitmq, launcher):
    """Confirm marks are written with the next store transaction (group commit): a server
    killed right after answering leaves rows unconfirmed. Every answered task must still
    run, once restarted (published again only if nobody reported on it), and the
    restarted server ends with no row left unconfirmed."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    tokens = [f"token-{i}-{uuid.uuid4().hex[:8]}" for i in range(30)]
    with qm.Client(server.address) as client:
        ids = [client.submit("test.echo", token, queue=queue) for token in tokens]
    server.kill()
    left_unconfirmed = unconfirmed_rows(server)
    assert queue_depth(rabbitmq.url, queue) == len(ids)  # OK came after each confirm
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    processes = [server, restarted, worker]
    with qm.Client(restarted.address) as client:
        finals = {}
        for status in client.watch(ids, timeout_s=RESULT_TIMEOUT_S * 3):
            if status.terminal:
                finals[status.task_id] = status
    assert {task_id: (s.state, s.result) for task_id, s in finals.items()} == \
        {task_id: ("SUCCEEDED", token) for task_id, token in zip(ids, tokens, strict=True)}, tails(processes)
    wait_until(lambda: not unconfirmed_rows(restarted), RESULT_TIMEOUT_S, message="every confirm mark written")
    ran = collections.Counter(run.task_id for run in executions([worker]))
    print(f"\n[faults] kill -9 after submits: {len(left_unconfirmed)} of {len(ids)} confirm marks unwritten at "
          f"the kill; executions logged once all were final {sum(ran.values())} "
          f"(run twice {sum(1 for n in ran.values() if n > 1)}; a republished copy may still be queued)",
          flush=True)
    assert set(ran) == set(ids)
