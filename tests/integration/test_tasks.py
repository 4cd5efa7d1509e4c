"""One task through the real system: gRPC server → RabbitMQ → worker pool → events → server."""
from __future__ import annotations

import pytest

import qm.errors

#: Bound on one task reaching a terminal state.
RESULT_TIMEOUT_S = 60.0


def test_math_task_succeeds_with_its_result_and_a_full_status(stack):
    task_id = stack.client.submit("math", "1 + 2 * 5", queue=stack.queue)

    result = stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S)

    logs = stack.server.logs + "\n" + stack.worker.logs
    assert result == "11", logs
    status = stack.client.status(task_id)
    assert status.task_id == task_id
    assert status.type == "math"
    assert status.queue == stack.queue
    assert status.state == "SUCCEEDED", logs
    assert status.result == "11"
    assert status.error == ""
    assert status.attempts == 1
    assert status.worker == stack.worker.worker_id
    assert status.created_at is not None
    assert status.started_at is not None
    assert status.finished_at is not None
    assert status.started_at <= status.finished_at


def test_failing_task_ends_failed_with_the_exception(stack):
    task_id = stack.client.submit("test.fail", "boom", queue=stack.queue)

    with pytest.raises(qm.errors.TaskError) as raised:
        stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S)

    assert raised.value.state == "FAILED"
    assert raised.value.task_id == task_id
    assert "RuntimeError: boom" in raised.value.error
    status = stack.client.status(task_id)
    assert status.state == "FAILED"
    assert "RuntimeError: boom" in status.error
    assert status.result is None
    assert status.attempts == 1
    assert status.finished_at is not None


def test_stream_shows_running_then_succeeded_live(stack):
    task_id = stack.client.submit("test.sleep", "1.0", queue=stack.queue)

    states = [status.state for status in stack.client.watch([task_id], timeout_s=RESULT_TIMEOUT_S)]

    # The first update is the state at the time the stream opened (QUEUED, or RUNNING if
    # the worker was quicker); then each change, live, in lifecycle order, once each.
    assert states in (["QUEUED", "RUNNING", "SUCCEEDED"], ["RUNNING", "SUCCEEDED"]), \
        f"{states}\n{stack.server.logs}"


def test_a_final_only_stream_sends_each_task_once_when_it_ends(stack):
    """StreamTaskResultsRequest.final_only (what Client.results asks for): one response per
    task, its final state, and nothing while it is queued or running."""
    import grpc

    from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
    from qm.states import TaskState

    done = stack.client.submit("math", "6 * 7", queue=stack.queue)
    assert stack.client.result(done, timeout_s=RESULT_TIMEOUT_S) == "42"
    slow = stack.client.submit("test.sleep", "1.0", queue=stack.queue)
    request = task_queue_pb2.StreamTaskResultsRequest(task_ids=[slow, done], final_only=True)
    with grpc.insecure_channel(stack.server.address) as channel:
        stream = task_queue_pb2_grpc.TaskQueueStub(channel).StreamTaskResults(iter([request]),
                                                                              timeout=RESULT_TIMEOUT_S)
        sent = [(response.status.task_id, TaskState.of_number(response.status.state).name,
                 response.status.result) for response in stream]

    # One response each, its final state; in which order depends on whether the slow task
    # had already ended when the stream opened (a loaded host), so the order is not asserted.
    assert sorted(sent) == sorted([(done, "SUCCEEDED", b"42"), (slow, "SUCCEEDED", b"1.0")]), stack.server.logs


def test_a_batched_stream_packs_finished_tasks_into_few_responses(stack):
    """StreamTaskResultsRequest.batched (what the clients ask for): the statuses ready at
    once come in one response's `statuses`, each task once, with its result."""
    import grpc

    from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
    from qm.states import TaskState

    ids = stack.client.submit_many([("math", f"{n} + 1") for n in range(50)], queue=stack.queue)
    assert len(list(stack.client.results(ids, timeout_s=RESULT_TIMEOUT_S))) == 50  # all finished now
    request = task_queue_pb2.StreamTaskResultsRequest(task_ids=ids, final_only=True, batched=True)
    with grpc.insecure_channel(stack.server.address) as channel:
        stream = task_queue_pb2_grpc.TaskQueueStub(channel).StreamTaskResults(iter([request]),
                                                                              timeout=RESULT_TIMEOUT_S)
        responses = list(stream)

    sent = [(status.task_id, TaskState.of_number(status.state).name, status.result)
            for response in responses for status in response.statuses]
    assert sorted(sent) == sorted((task_id, "SUCCEEDED", b"%d" % (n + 1)) for n, task_id in enumerate(ids))
    assert len(responses) < len(ids), f"{len(responses)} responses for {len(ids)} finished tasks"
    assert not any(response.HasField("status") for response in responses)
