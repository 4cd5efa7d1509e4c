"""Retries through the real system: which outcomes are tried again and how often, what a
follower sees meanwhile (RETRYING with the error and the next attempt's time), the
server's default budget, and that the wait between attempts happens in RabbitMQ (a wait
queue), not in a worker, which meanwhile runs other tasks."""
from __future__ import annotations

import types

import pytest

import qm
from tests.processes import Gate
from tests.time_limits import assert_ended_at_limit

#: Bound on one task (all of its attempts and waits) reaching a terminal state.
RESULT_TIMEOUT_S = 90.0
#: How much earlier than its RETRYING event's time plus the delay a next attempt may start:
#: the wait queue's TTL starts when RabbitMQ takes the message, just before the worker
#: stamps the RETRYING event (after the confirm).
RETRY_EARLY_S = 0.25


@pytest.fixture
def make_stack(rabbitmq, launcher):
    """make_stack(procs=2, server_env=None): a server and a worker on a queue of this test's
    own; `.client` is a qm.Client of that server."""
    clients: list[qm.Client] = []

    def make(procs: int = 2, server_env: dict[str, str] | None = None) -> types.SimpleNamespace:
        queue = launcher.queue(rabbitmq.url)
        server = launcher.server(rabbitmq.url, env=server_env)
        launcher.track_queue(rabbitmq.url, f"qm.dead.{server.server_id}")
        worker = launcher.worker(rabbitmq.url, procs=procs, queues=queue)
        client = qm.Client(server.address)
        clients.append(client)
        return types.SimpleNamespace(server=server, worker=worker, queue=queue, client=client)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def stack(make_stack):
    return make_stack()


def follow(stack, task_id: str) -> list[qm.client.client.TaskStatus]:
    """Every status the stream shows for the task, until it is terminal (bounded)."""
    statuses = list(stack.client.watch([task_id], timeout_s=RESULT_TIMEOUT_S))
    assert statuses and statuses[-1].terminal, f"{statuses}\n{stack.server.logs}\n{stack.worker.logs}"
    return statuses


def final(stack, task_id: str) -> qm.client.client.TaskStatus:
    return follow(stack, task_id)[-1]


def logs(stack) -> str:
    return f"{stack.server.logs}\n{stack.worker.logs}"


def started_after_waits(statuses, delays_s: list[float]) -> list[float]:
    """Assert that each attempt after a RETRYING status started only once that retry's
    delay had passed (the next attempt's started_at, not the due time the worker announced
    with it); return the waits seen."""
    retrying = [status for status in statuses if status.state == "RETRYING"]
    assert len(retrying) == len(delays_s), [(s.state, s.attempts) for s in statuses]
    waits = []
    for status, delay_s in zip(retrying, delays_s, strict=True):
        following = [later for later in statuses
                     if later.attempts == status.attempts + 1 and later.started_at is not None]
        assert following, f"no start of attempt {status.attempts + 1} seen: {statuses}"
        waited = following[0].started_at - status.updated_at
        assert waited >= delay_s - RETRY_EARLY_S, (
            f"attempt {status.attempts + 1} started {waited:.3f} s after attempt {status.attempts} "
            f"asked for a retry in {delay_s:g} s")
        waits.append(waited)
    return waits


def test_flaky_task_is_retried_until_it_succeeds_and_followers_see_each_retry(stack, tmp_path):
    counter = tmp_path / "flaky-runs"
    task_id = stack.client.submit("test.flaky", f"{counter}:2", queue=stack.queue, max_retries=3,
                                  retry_backoff_s=1, retry_jitter=False)

    statuses = follow(stack, task_id)

    last = statuses[-1]
    assert last.state == "SUCCEEDED", logs(stack)
    assert last.result == "succeeded on run 3"
    assert last.attempts == 3
    assert last.max_retries == 3
    assert counter.read_text() == "xxx"
    retrying = [status for status in statuses if status.state == "RETRYING"]
    assert [status.attempts for status in retrying] == [1, 2], [(s.state, s.attempts) for s in statuses]
    assert statuses.index(retrying[-1]) < len(statuses) - 1
    for status, failure in zip(retrying, ("flaky failure 1 of 2", "flaky failure 2 of 2"), strict=True):
        assert failure in status.error and "RuntimeError" in status.error
        assert status.next_attempt_at is not None and status.updated_at is not None
    # Exponential backoff without jitter: the first retry waits 1 s, the second 2 s.
    waits = [status.next_attempt_at - status.updated_at for status in retrying]
    assert waits[0] == pytest.approx(1.0, abs=0.25) and waits[1] == pytest.approx(2.0, abs=0.25), waits
    started_after_waits(statuses, [1.0, 2.0])
    assert last.next_attempt_at is None
    assert last.error == ""


def test_failing_task_is_tried_max_retries_plus_one_times_then_fails(stack):
    task_id = stack.client.submit("test.fail", "still broken", queue=stack.queue, max_retries=1)

    last = final(stack, task_id)

    assert last.state == "FAILED", logs(stack)
    assert last.attempts == 2
    assert "RuntimeError: still broken" in last.error


def test_permanent_error_is_not_retried(stack):
    task_id = stack.client.submit("test.permanent", "cannot work", queue=stack.queue, max_retries=3)

    statuses = follow(stack, task_id)

    assert statuses[-1].state == "FAILED", logs(stack)
    assert statuses[-1].attempts == 1
    assert "PermanentError" in statuses[-1].error and "cannot work" in statuses[-1].error
    assert "RETRYING" not in [status.state for status in statuses]


def test_task_asking_for_retries_gets_them_within_its_budget_then_fails(stack):
    task_id = stack.client.submit("test.retry", "1", queue=stack.queue, max_retries=2)

    statuses = follow(stack, task_id)

    last = statuses[-1]
    assert last.state == "FAILED", logs(stack)
    assert last.attempts == 3
    assert "Retry" in last.error
    retrying = [status for status in statuses if status.state == "RETRYING"]
    assert [status.attempts for status in retrying] == [1, 2]
    # the task's own delay (1 s) is used, not the policy's (jittered) backoff
    for status in retrying:
        assert status.next_attempt_at - status.updated_at == pytest.approx(1.0, abs=0.25)
    started_after_waits(statuses, [1.0, 1.0])


def test_timed_out_task_is_not_retried_by_default(stack):
    task_id = stack.client.submit("test.sleep", "10", queue=stack.queue, timeout_s=1, max_retries=2)

    statuses = follow(stack, task_id)

    assert statuses[-1].state == "TIMED_OUT", logs(stack)
    assert statuses[-1].attempts == 1
    assert "RETRYING" not in [status.state for status in statuses]
    assert_ended_at_limit(statuses[-1], 1)  # 1 s of its 10


def test_timed_out_task_is_retried_with_retry_on_timeout(stack):
    task_id = stack.client.submit("test.sleep", "10", queue=stack.queue, timeout_s=1, max_retries=2,
                                  retry_on_timeout=True, retry_backoff_s=1, retry_jitter=False)

    statuses = follow(stack, task_id)

    assert statuses[-1].state == "TIMED_OUT", logs(stack)
    assert statuses[-1].attempts == 3
    assert [status.attempts for status in statuses if status.state == "RETRYING"] == [1, 2]
    assert_ended_at_limit(statuses[-1], 1)  # the last attempt, too, got 1 s of its 10


def test_memory_exceeded_is_never_retried(stack):
    task_id = stack.client.submit("test.alloc", "4096", queue=stack.queue, memory_limit_mb=200, max_retries=2)

    statuses = follow(stack, task_id)

    assert statuses[-1].state == "MEMORY_EXCEEDED", logs(stack)
    assert statuses[-1].attempts == 1
    assert "RETRYING" not in [status.state for status in statuses]


def test_server_default_policy_applies_when_the_submission_sets_none(make_stack):
    stack = make_stack(server_env={"QM_SERVER__DEFAULT_MAX_RETRIES": "1", "QM_SERVER__DEFAULT_RETRY_BACKOFF_S": "2",
                                   "QM_SERVER__DEFAULT_RETRY_JITTER": "false"})

    defaulted = stack.client.submit("test.fail", "default budget", queue=stack.queue)
    no_retries = stack.client.submit("test.fail", "own budget", queue=stack.queue, max_retries=0)

    statuses = follow(stack, defaulted)
    last = statuses[-1]
    assert last.state == "FAILED", logs(stack)
    assert last.attempts == 2
    assert last.max_retries == 1
    retrying = [status for status in statuses if status.state == "RETRYING"]
    assert len(retrying) == 1
    assert retrying[0].next_attempt_at - retrying[0].updated_at == pytest.approx(2.0, abs=0.25)  # the server's backoff
    started_after_waits(statuses, [2.0])
    own = final(stack, no_retries)
    assert own.state == "FAILED"
    assert own.attempts == 1, "an explicit max_retries=0 must beat the server's default"
    assert own.max_retries == 0


def test_retry_waits_in_rabbitmq_while_the_worker_runs_other_tasks(make_stack, tmp_path):
    """One child: if the wait happened in the worker, nothing else could run meanwhile. The
    other task, submitted as soon as the retry is announced, is gated: it holds the only
    child until the test has seen it running while the retry was still waiting, so the
    order does not depend on how fast the machine is."""
    stack = make_stack(procs=1)
    counter = tmp_path / "flaky-runs"
    gate = Gate(tmp_path)
    task_id = stack.client.submit("test.flaky", f"{counter}:1", queue=stack.queue, max_retries=1,
                                  retry_backoff_s=5, retry_jitter=False)

    retrying = other_id = None
    statuses = []
    try:
        for status in stack.client.watch([task_id], timeout_s=RESULT_TIMEOUT_S):
            statuses.append(status)
            if status.state == "RETRYING" and other_id is None:
                retrying = status
                other_id = stack.client.submit("test.wait_for", gate.payload, queue=stack.queue)
                running = next(s for s in stack.client.watch([other_id], timeout_s=RESULT_TIMEOUT_S)
                               if s.state == "RUNNING" or s.terminal)
                assert running.state == "RUNNING", (running, logs(stack))
                waiting = stack.client.status(task_id)
                assert (waiting.state, waiting.attempts) == ("RETRYING", 1), (waiting, logs(stack))
                gate.open()
    finally:
        gate.open()
    last = statuses[-1]

    assert retrying is not None, [s.state for s in statuses]
    assert last.state == "SUCCEEDED" and last.attempts == 2, logs(stack)
    other = final(stack, other_id)
    assert other.state == "SUCCEEDED" and other.result == gate.payload, logs(stack)
    assert other.worker == stack.worker.worker_id
    # the retried attempt started only after its wait, and the other task ran within it
    assert last.started_at - retrying.updated_at >= 4.0, (retrying, last)
    assert other.finished_at < last.started_at, (other, last)
    assert counter.read_text() == "xx"
