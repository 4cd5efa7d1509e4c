"""A flood of submissions over the per-caller rate limit (issue 12, items 3 and 7): the
excess is refused RESOURCE_EXHAUSTED with a retry hint, only what was accepted is stored
and enqueued, a normal client is answered within 1 s throughout, and a qm.Client that
honours the hint gets all of its tasks in. Real qm-server and RabbitMQ (no worker: the
accepted tasks stay in their queue to be counted).
"""
from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

import qm
from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import error_reason
from qm.errors import WaitTimeout
from qm.server.admission import RETRY_PUSHBACK_KEY
from tests.processes import unique, wait_until
from tests.security.caps_support import (
    CALL_TIMEOUT_S,
    NormalClient,
    caps_stack,
    trailing,
)
from tests.security.support import ready_messages, stored_tasks

RATE_PER_S = 10
BURST = 20
FLOOD = 200
#: server.max_stream_s of this module's server.
STREAM_S = 2


@pytest.fixture(scope="module")
def stack(rabbitmq, tmp_path_factory):
    queue = unique("caps-rate")
    env = {"QM_SERVER__QUEUES": queue, "QM_SERVER__SUBMIT_RATE_PER_S": str(RATE_PER_S),
           "QM_SERVER__SUBMIT_BURST": str(BURST), "QM_SERVER__MAX_BATCH_ITEMS": str(BURST),
           "QM_SERVER__MAX_STREAM_S": str(STREAM_S)}
    with caps_stack(rabbitmq.url, tmp_path_factory.mktemp("rate"), env, [queue]) as stack:
        stack.queue = queue
        yield stack


def submit(stack, index: int) -> grpc.RpcError | str:
    request = task_queue_pb2.SubmitTaskRequest(type="math", payload=f"{index} + 1".encode(), queue=stack.queue)
    try:
        return stack.stub.SubmitTask(request, timeout=CALL_TIMEOUT_S).task_id
    except grpc.RpcError as exc:
        return exc


def test_a_flood_over_the_rate_limit_is_refused_with_a_retry_hint(stack):
    stored = stored_tasks(stack.server.data_dir)
    with NormalClient(stack.server.address) as normal, concurrent.futures.ThreadPoolExecutor(16) as pool:
        started = time.monotonic()
        outcomes = list(pool.map(lambda i: submit(stack, i), range(FLOOD)))
        elapsed_s = time.monotonic() - started
    normal.check()
    accepted = [outcome for outcome in outcomes if isinstance(outcome, str)]
    refused = [outcome for outcome in outcomes if not isinstance(outcome, str)]
    assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused[:3]
    assert BURST <= len(accepted) <= BURST + RATE_PER_S * elapsed_s + 1, (len(accepted), elapsed_s)
    for error in refused:
        assert error_reason(error) == "RATE_LIMITED", error
        assert "server.submit_rate_per_s" in error.details() and "retry in" in error.details(), error.details()
        assert int(trailing(error)[RETRY_PUSHBACK_KEY]) > 0, trailing(error)
    # Only what was accepted is stored and enqueued.
    assert stored_tasks(stack.server.data_dir) == stored + len(accepted)
    assert ready_messages(stack.broker_url, stack.queue) == len(accepted)
    # The hint is honest: after it, this caller may submit again.
    hint_ms = int(trailing(refused[-1])[RETRY_PUSHBACK_KEY])
    assert wait_until(lambda: isinstance(submit(stack, -1), str), timeout_s=hint_ms / 1000 + 10)


def test_a_batch_over_the_rate_limit_is_refused_whole(stack):
    items = [task_queue_pb2.SubmitTaskRequest(type="math", payload=b"1", queue=stack.queue)] * BURST
    with NormalClient(stack.server.address) as normal:
        while isinstance(submit(stack, 0), str):  # use up the bucket (bounded: it holds BURST)
            pass
        stored = stored_tasks(stack.server.data_dir)
        with pytest.raises(grpc.RpcError) as refused:
            stack.stub.SubmitTasks(task_queue_pb2.SubmitTasksRequest(items=items), timeout=CALL_TIMEOUT_S)
    normal.check()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert f"{BURST} task(s) refused" in refused.value.details(), refused.value.details()
    assert error_reason(refused.value) == "RATE_LIMITED"
    assert stored_tasks(stack.server.data_dir) == stored


def test_a_group_counts_each_member_and_its_callback_against_the_rate(stack):
    items = [task_queue_pb2.SubmitTaskRequest(type="math", payload=b"1", queue=stack.queue)] * (BURST - 1)
    then = task_queue_pb2.SubmitTaskRequest(type="math", payload=b"0", queue=stack.queue)
    with NormalClient(stack.server.address) as normal:
        while isinstance(submit(stack, 0), str):  # use up the bucket (bounded: it holds BURST)
            pass
        stored = stored_tasks(stack.server.data_dir)
        with pytest.raises(grpc.RpcError) as refused:
            stack.stub.SubmitGroup(task_queue_pb2.SubmitGroupRequest(items=items, then=then, idempotency_key="g"),
                                   timeout=CALL_TIMEOUT_S)
    normal.check()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert f"{BURST} task(s) refused" in refused.value.details(), refused.value.details()
    assert error_reason(refused.value) == "RATE_LIMITED"
    assert stored_tasks(stack.server.data_dir) == stored


def test_a_client_that_honours_the_hint_gets_every_task_in(stack):
    """qm.Client retries RESOURCE_EXHAUSTED after retry-pushback-ms, with the same keys."""
    stored = stored_tasks(stack.server.data_dir)
    count = 3 * BURST
    with qm.Client(stack.server.address, submit_retry_s=60, batch_items=BURST) as client:
        ids = client.submit_many([("math", f"{i} * 2") for i in range(count)], queue=stack.queue)
    assert len(set(ids)) == count
    assert stored_tasks(stack.server.data_dir) == stored + count


def test_a_stream_open_past_its_lifetime_ends_unavailable_and_the_client_resumes(stack):
    """No worker here: the task stays QUEUED, so only the lifetime can end the stream."""
    task_id = wait_until(lambda: (lambda outcome: outcome if isinstance(outcome, str) else None)(submit(stack, 7)),
                         timeout_s=30, message="a submit within the rate limit")
    request = task_queue_pb2.StreamTaskResultsRequest(task_ids=[task_id])
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stack.stub.StreamTaskResults(iter([request]), timeout=CALL_TIMEOUT_S):
            pass
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
    assert error_reason(ended.value) == "STREAM_EXPIRED" and "server.max_stream_s" in ended.value.details()
    with qm.Client(stack.server.address) as client:  # a qm client rides it out: resumes on a new stream
        with pytest.raises(WaitTimeout):
            list(client.watch([task_id], timeout_s=3 * STREAM_S))
    # A wait for final states hears nothing from a queued task, for longer than its client's
    # reconnect window: each expired stream is still opened again, until the caller's timeout.
    with qm.Client(stack.server.address, reconnect_s=STREAM_S / 4) as client:
        with pytest.raises(WaitTimeout):
            list(client.results([task_id], timeout_s=3 * STREAM_S))
