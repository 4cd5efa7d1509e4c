"""Delayed tasks with real RabbitMQ and real processes: SCHEDULED until due, run no earlier
than asked and exactly once, even across a kill -9 of the server; a cancelled one never runs.
Each task is test.flaky "PATH:0": it succeeds on its first run and appends one mark to PATH
per run, so the file tells how many times it ran."""
from __future__ import annotations

import time

import pytest

import qm
from tests.processes import wait_until

pytestmark = pytest.mark.timeout(300)

#: Bound on any wait for a delayed task to finish (restarts included).
RESULT_TIMEOUT_S = 120.0


def runs(path) -> int:
    return len(path.read_text()) if path.exists() else 0


def test_a_delayed_task_is_scheduled_then_runs_no_earlier_than_its_delay(stack, tmp_path):
    counter = tmp_path / "runs"
    submitted_s = time.time()
    task_id = stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue, delay_s=2)
    status = stack.client.status(task_id)
    if status.state != "SCHEDULED":  # only a machine stalled over 2 s sees anything else
        assert time.time() - submitted_s >= 2, status
    assert status.next_attempt_at >= submitted_s + 2, status

    assert stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 1"
    final = stack.client.status(task_id)
    assert final.started_at >= submitted_s + 2, (final, submitted_s)
    assert runs(counter) == 1


def test_a_cancelled_scheduled_task_never_runs(stack, tmp_path):
    cancelled_runs, later_runs = tmp_path / "cancelled", tmp_path / "later"
    cancelled = stack.client.submit("test.flaky", f"{cancelled_runs}:0", queue=stack.queue, delay_s=2)
    assert stack.client.cancel(cancelled).state == "CANCELLED"
    # The same delay, submitted after: it comes out of the same delay tier and work queue
    # behind the cancelled one, so once it ran, the cancelled one came up and was dropped.
    later = stack.client.submit("test.flaky", f"{later_runs}:0", queue=stack.queue, delay_s=2)
    assert stack.client.result(later, timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 1"
    assert runs(cancelled_runs) == 0
    assert stack.client.status(cancelled).state == "CANCELLED"


def test_scheduled_tasks_run_once_when_due_after_a_kill_9_of_the_server(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    counters = [tmp_path / f"runs-{n}" for n in range(4)]
    with qm.Client(server.address) as client:
        task_ids = [client.submit("test.flaky", f"{counter}:0", queue=queue, delay_s=3 + n)
                    for n, counter in enumerate(counters)]
        assert {client.status(task_id).state for task_id in task_ids} <= {"SCHEDULED", "QUEUED"}
    server.kill()
    # The server stays down while the tasks come due: only RabbitMQ and the worker hold them.
    wait_until(lambda: all(runs(counter) for counter in counters), RESULT_TIMEOUT_S,
               message="every scheduled task running while its server is down")
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])
    with qm.Client(restarted.address) as client:
        for task_id in task_ids:
            assert client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 1"
    assert [runs(counter) for counter in counters] == [1, 1, 1, 1]


def test_a_follower_sees_a_scheduled_task_come_due_as_queued(stack, launcher, rabbitmq):
    idle = launcher.queue(rabbitmq.url)  # no worker consumes it: once due, the task waits QUEUED
    submitted_s = time.time()
    task_id = stack.client.submit("math", "6 * 7", queue=idle, delay_s=3)
    seen = []
    for status in stack.client.watch([task_id], timeout_s=RESULT_TIMEOUT_S):
        seen.append(status.state)
        if status.state == "QUEUED":
            assert stack.client.status(task_id).state == "QUEUED"
            stack.client.cancel(task_id)
    if seen[0] != "SCHEDULED":  # only a machine stalled over 3 s before the watch began sees this
        assert seen[0] == "QUEUED" and time.time() - submitted_s >= 3, seen
        seen.insert(0, "SCHEDULED")
    assert seen == ["SCHEDULED", "QUEUED", "CANCELLED"], seen
