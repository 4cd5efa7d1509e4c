"""What the gRPC API refuses, with which status code and which message."""
from __future__ import annotations

import grpc
import pika
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc

#: Deadline of each call in these tests.
CALL_TIMEOUT_S = 30.0


@pytest.fixture
def server(rabbitmq, launcher):
    """A server with the payload limit lowered to 100 bytes (and no worker)."""
    return launcher.server(rabbitmq.url, env={"QM_SERVER__MAX_PAYLOAD_BYTES": "100"})


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield task_queue_pb2_grpc.TaskQueueStub(channel)


def submit_error(stub, type: str, payload: bytes, queue: str) -> grpc.RpcError:
    """Submit and return the error; fails the test if a task id came back instead."""
    request = task_queue_pb2.SubmitTaskRequest(type=type, payload=payload, queue=queue)
    try:
        response = stub.SubmitTask(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc
    pytest.fail(f"submission of {type} {payload[:40]!r} was accepted as task {response.task_id}")


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo in the error's status details, as any gRPC client reads it."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no status details on {error}"
    found = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            found.append(info)
    assert len(found) == 1, status
    assert found[0].domain == "qm.v1", found[0]
    return found[0]


def ready_messages(broker_url: str, queue: str) -> int:
    """Messages waiting in the logical queue's AMQP queue (0 if it was never declared)."""
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        channel = connection.channel()
        try:
            return channel.queue_declare(f"qm.tasks.{queue}", passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 404, exc
            return 0


def test_submissions_that_are_refused_name_the_field_and_enqueue_nothing(rabbitmq, launcher, server, stub):
    queue = launcher.queue(rabbitmq.url)

    unknown = submit_error(stub, "nosuchtype", b"1", queue)
    assert unknown.code() is grpc.StatusCode.INVALID_ARGUMENT, unknown
    assert "type" in unknown.details() and "nosuchtype" in unknown.details()
    assert (error_info(unknown).reason, dict(error_info(unknown).metadata)) == ("UNKNOWN_TASK_TYPE", {"field": "type"})

    invalid = submit_error(stub, "math", b"1 +", queue)
    assert invalid.code() is grpc.StatusCode.INVALID_ARGUMENT, invalid
    assert "payload" in invalid.details()

    too_big = submit_error(stub, "test.echo", b"x" * 101, queue)
    assert too_big.code() is grpc.StatusCode.INVALID_ARGUMENT, too_big
    assert "payload" in too_big.details() and "100" in too_big.details()

    bad_queue = submit_error(stub, "test.echo", b"x", "no spaces allowed")
    assert bad_queue.code() is grpc.StatusCode.INVALID_ARGUMENT, bad_queue
    assert "queue" in bad_queue.details()
    assert (error_info(bad_queue).reason, dict(error_info(bad_queue).metadata)) == ("INVALID_FIELD", {"field": "queue"})

    assert ready_messages(rabbitmq.url, queue) == 0


def test_payload_at_the_limit_is_accepted(rabbitmq, launcher, server, stub):
    queue = launcher.queue(rabbitmq.url)
    request = task_queue_pb2.SubmitTaskRequest(type="test.echo", payload=b"x" * 100, queue=queue)

    response = stub.SubmitTask(request, timeout=CALL_TIMEOUT_S)

    assert response.task_id
    assert response.state == task_queue_pb2.TASK_STATE_QUEUED
    assert ready_messages(rabbitmq.url, queue) == 1


def test_unknown_task_id_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as status:
        stub.GetTaskStatus(task_queue_pb2.GetTaskStatusRequest(task_id="no-such-task"), timeout=CALL_TIMEOUT_S)
    assert status.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no-such-task" in status.value.details()
    assert (error_info(status.value).reason, error_info(status.value).metadata["task_id"]) == \
        ("TASK_NOT_FOUND", "no-such-task")

    request = task_queue_pb2.StreamTaskResultsRequest(task_ids=["no-such-task"])
    with pytest.raises(grpc.RpcError) as stream:
        list(stub.StreamTaskResults(iter([request]), timeout=CALL_TIMEOUT_S))
    assert stream.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no-such-task" in stream.value.details()
    assert error_info(stream.value).reason == "TASK_NOT_FOUND"  # a stream's status carries it too
