"""Cancellation (a queued task never runs, a running one is killed, a finished one cannot be
cancelled; `qm cancel`) and idempotent submission (the same key is one task, even when
submitted concurrently, and the client's own retries through a broker outage run the task
exactly once)."""
from __future__ import annotations

import threading
import time
import types

import grpc
import psutil
import pytest

import qm
from qm.client.client import RemoteError
from tests.processes import gone, run_qm, wait_until, worker_status

#: Bound on one task reaching a terminal state.
RESULT_TIMEOUT_S = 90.0
#: Bound on a cancelled task's child process ending.
KILL_TIMEOUT_S = 20.0
#: Bound on the server and worker reconnecting, and the submit returning, after RabbitMQ is back.
RECONNECT_TIMEOUT_S = 90.0
#: Reconnect backoff cap for the outage test's processes (broker.reconnect_max_delay_s).
FAST_RECONNECT = {"QM_BROKER__RECONNECT_MAX_DELAY_S": "1"}
#: Concurrent submitters sharing one idempotency key.
SUBMITTERS = 8
#: "Fail fast": a submit while RabbitMQ is down is answered within this (expected: ms).
FAIL_FAST_S = 2.0


@pytest.fixture
def make_stack(rabbitmq, launcher):
    """make_stack(procs=1, worker=True): a server (and a worker) on a queue of this test's
    own; `.client` is a qm.Client of the server, `.start_worker()` starts a worker later."""
    clients: list[qm.Client] = []

    def make(procs: int = 1, worker: bool = True) -> types.SimpleNamespace:
        queue = launcher.queue(rabbitmq.url)
        server = launcher.server(rabbitmq.url)
        launcher.track_queue(rabbitmq.url, f"qm.dead.{server.server_id}")
        client = qm.Client(server.address)
        clients.append(client)
        stack = types.SimpleNamespace(server=server, worker=None, queue=queue, client=client)

        def start_worker():
            stack.worker = launcher.worker(rabbitmq.url, procs=procs, queues=queue)
            return stack.worker

        stack.start_worker = start_worker
        if worker:
            start_worker()
        return stack

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def stack(make_stack):
    return make_stack()


def logs(stack) -> str:
    return "\n".join(process.logs for process in (stack.server, stack.worker) if process is not None)


def runs(counter) -> int:
    """How many times test.flaky ran with this counter file."""
    return len(counter.read_text()) if counter.exists() else 0


def echo_after(stack, text: str = "after") -> None:
    """A test.echo submitted now succeeds: the (one-child) worker has got past everything
    queued before it."""
    task_id = stack.client.submit("test.echo", text, queue=stack.queue)
    assert stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == text, logs(stack)
    assert stack.client.status(task_id).worker == stack.worker.worker_id


# -- cancel ------------------------------------------------------------------------------

def test_cancelled_queued_task_stays_cancelled_when_a_worker_comes(make_stack, tmp_path):
    stack = make_stack(worker=False)
    counter = tmp_path / "runs"
    task_id = stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue)
    assert stack.client.status(task_id).state == "QUEUED"

    cancelled = stack.client.cancel(task_id)

    assert cancelled.state == "CANCELLED"
    assert cancelled.error == "cancelled by request"
    assert stack.client.status(task_id).state == "CANCELLED"
    stack.start_worker()
    echo_after(stack)
    status = stack.client.status(task_id)
    assert status.state == "CANCELLED", logs(stack)
    assert status.worker == ""
    assert status.result is None


def test_cancelled_queued_task_never_runs_on_a_worker_started_later(make_stack, tmp_path):
    stack = make_stack(worker=False)
    counter = tmp_path / "runs"
    task_id = stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue)
    assert stack.client.cancel(task_id).state == "CANCELLED"

    stack.start_worker()
    echo_after(stack)

    assert runs(counter) == 0, f"the cancelled task ran {runs(counter)} time(s)\n{logs(stack)}"


def test_cancelling_a_running_task_kills_its_child_and_the_worker_carries_on(stack):
    task_id = stack.client.submit("test.sleep", "30", queue=stack.queue)
    running = next(status for status in stack.client.watch([task_id], timeout_s=RESULT_TIMEOUT_S)
                   if status.state == "RUNNING" or status.terminal)
    assert running.state == "RUNNING", logs(stack)
    children = [child for child in worker_status(stack.worker).children if child.task_id == task_id]
    assert len(children) == 1, worker_status(stack.worker)
    child = psutil.Process(children[0].pid)

    cancelled = stack.client.cancel(task_id)

    assert cancelled.state == "CANCELLED"
    wait_until(lambda: gone(child), KILL_TIMEOUT_S, message=f"the cancelled task's child {child.pid} ending")
    wait_until(lambda: not any(c.task_id for c in worker_status(stack.worker).children), KILL_TIMEOUT_S,
               message="the worker's child slot freed")
    echo_after(stack)
    final = stack.client.status(task_id)
    assert final.state == "CANCELLED", logs(stack)
    assert final.result is None
    assert stack.worker.alive()


def test_cancelled_task_waiting_for_its_retry_is_not_run_again(stack, tmp_path):
    counter = tmp_path / "runs"
    task_id = stack.client.submit("test.flaky", f"{counter}:5", queue=stack.queue, max_retries=3,
                                  retry_backoff_s=2, retry_jitter=False)
    retrying = next(status for status in stack.client.watch([task_id], timeout_s=RESULT_TIMEOUT_S)
                    if status.state == "RETRYING" or status.terminal)
    assert retrying.state == "RETRYING", logs(stack)

    assert stack.client.cancel(task_id).state == "CANCELLED"

    # The retry message comes back from its wait queue and the worker drops it.
    stack.worker.wait_for_line(f"task {task_id} was cancelled; dropping it", RESULT_TIMEOUT_S)
    echo_after(stack)
    assert runs(counter) == 1
    assert stack.client.status(task_id).state == "CANCELLED"


def test_cancelling_a_finished_task_is_refused(stack):
    task_id = stack.client.submit("test.echo", "done", queue=stack.queue)
    assert stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "done"

    with pytest.raises(RemoteError) as caught:
        stack.client.cancel(task_id)

    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "SUCCEEDED" in str(caught.value)
    assert stack.client.status(task_id).state == "SUCCEEDED"
    refused = run_qm("cancel", task_id, server=stack.server.address)
    assert refused.returncode == 1 and "already ended SUCCEEDED" in refused.stderr, refused


def test_qm_cancel_prints_the_new_state(make_stack):
    stack = make_stack(worker=False)
    task_id = stack.client.submit("test.echo", "never", queue=stack.queue)

    result = run_qm("cancel", task_id, server=stack.server.address)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{task_id} CANCELLED"
    assert stack.client.status(task_id).state == "CANCELLED"


def test_cancelling_an_unknown_task_is_not_found(make_stack):
    stack = make_stack(worker=False)

    with pytest.raises(RemoteError) as caught:
        stack.client.cancel("no-such-task")

    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    result = run_qm("cancel", "no-such-task", server=stack.server.address)
    assert result.returncode == 1 and "no-such-task" in result.stderr, result


# -- idempotency -------------------------------------------------------------------------

def test_same_idempotency_key_is_one_task_run_once(stack, tmp_path):
    counter = tmp_path / "runs"
    key = f"key-{tmp_path.name}"

    first = stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue, idempotency_key=key)
    second = stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue, idempotency_key=key)

    assert second == first
    assert stack.client.result(first, timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 1", logs(stack)
    late = stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue, idempotency_key=key)
    assert late == first  # remembered after the task finished, too
    echo_after(stack)
    assert runs(counter) == 1
    assert stack.client.status(first).attempts == 1


def test_concurrent_submits_with_one_key_make_one_task(stack, tmp_path):
    counter = tmp_path / "runs"
    key = f"key-{tmp_path.name}"
    ids: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(SUBMITTERS)

    def submit() -> None:
        try:
            with qm.Client(stack.server.address) as client:
                start.wait(30)
                ids.append(client.submit("test.flaky", f"{counter}:0", queue=stack.queue, idempotency_key=key))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, daemon=True) for _ in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RESULT_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a submit neither returned nor failed"

    assert not errors, errors
    assert len(ids) == SUBMITTERS and len(set(ids)) == 1, ids
    assert stack.client.result(ids[0], timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 1", logs(stack)
    echo_after(stack)
    assert runs(counter) == 1


def test_different_keys_are_different_tasks(stack, tmp_path):
    counter = tmp_path / "runs"

    ids = [stack.client.submit("test.flaky", f"{counter}:0", queue=stack.queue,
                               idempotency_key=f"{key}-{tmp_path.name}") for key in ("one", "two")]

    assert ids[0] != ids[1]
    results = sorted(stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S) for task_id in ids)
    assert results == ["succeeded on run 1", "succeeded on run 2"], logs(stack)
    assert runs(counter) == 2


def test_submit_retries_through_a_broker_outage_and_the_task_runs_once(own_rabbitmq, launcher, tmp_path):
    queue = launcher.queue(own_rabbitmq.url)
    launcher.forget_queues(own_rabbitmq.url)  # the private node is gone before teardown
    server = launcher.server(own_rabbitmq.url, env=FAST_RECONNECT)
    worker = launcher.worker(own_rabbitmq.url, procs=1, queues=queue, env=FAST_RECONNECT)
    counter = tmp_path / "runs"
    outcome: dict[str, object] = {}

    def submit() -> None:
        try:
            with qm.Client(server.address, submit_retry_s=60) as patient:
                outcome["id"] = patient.submit("test.flaky", f"{counter}:0", queue=queue)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    with qm.Client(server.address, submit_retry_s=0) as client:
        own_rabbitmq.stop()
        asked = time.monotonic()
        with pytest.raises(RemoteError) as down:
            client.submit("test.echo", "refused", queue=queue)
        answered_s = time.monotonic() - asked
        assert down.value.code is grpc.StatusCode.UNAVAILABLE
        assert answered_s < FAIL_FAST_S, f"UNAVAILABLE took {answered_s:.2f} s while RabbitMQ is down"

        submitter = threading.Thread(target=submit, daemon=True)
        submitter.start()
        submitter.join(2.0)
        assert submitter.is_alive(), f"the submit returned while RabbitMQ was down: {outcome}"
        own_rabbitmq.start()
        submitter.join(RECONNECT_TIMEOUT_S)

        assert not submitter.is_alive(), "the submit did not return after RabbitMQ came back"
        assert "error" not in outcome, outcome.get("error")
        task_id = outcome["id"]
        assert client.result(task_id, timeout_s=RECONNECT_TIMEOUT_S) == "succeeded on run 1", \
            f"{server.logs}\n{worker.logs}"
        after = client.submit("test.echo", "after", queue=queue)
        assert client.result(after, timeout_s=RESULT_TIMEOUT_S) == "after"
        assert runs(counter) == 1, f"{server.logs}\n{worker.logs}"
