"""Hostile clients against the caps (issue 12, item 7): each attack gets its documented
status code, a normal client is answered within 1 s during and after it, and nothing is
stored or enqueued for a refused request. Real qm-server, qm-worker and RabbitMQ.
"""
from __future__ import annotations

import json
import uuid

import grpc
import pytest

import qm
from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import error_reason, stream_ids_limit
from tests.processes import unique
from tests.security.caps_support import (
    CALL_TIMEOUT_S,
    NormalClient,
    caps_stack,
    submit_error,
)
from tests.security.support import ready_messages, stored_tasks

#: Tasks the capped work queue holds (broker.max_queue_length for this module's stack).
QUEUE_CAP = 5
#: The payload validator budget of this module's server (server.validate_timeout_s).
VALIDATE_BUDGET_S = 0.5


@pytest.fixture(scope="module")
def stack(rabbitmq, tmp_path_factory):
    """A server accepting two queues: `worked` (a worker consumes it) and `capped` (no
    consumer, so it fills up to QUEUE_CAP)."""
    worked, capped = unique("caps-worked"), unique("caps-capped")
    env = {"QM_SERVER__QUEUES": f"{worked},{capped}", "QM_BROKER__MAX_QUEUE_LENGTH": str(QUEUE_CAP),
           "QM_SERVER__VALIDATE_TIMEOUT_S": str(VALIDATE_BUDGET_S), "QM_SERVER__MAX_TASK_TIMEOUT_S": "60",
           "QM_SERVER__MAX_RETRIES": "3"}
    with caps_stack(rabbitmq.url, tmp_path_factory.mktemp("limits"), env, [worked, capped], worked) as stack:
        stack.worked, stack.capped = worked, capped
        yield stack


def refused_leaves_nothing(stack, attack) -> grpc.RpcError:
    """Run `attack()` (returning the gRPC error it met) while a normal client asks the
    server; check the normal client was answered and nothing was stored or enqueued."""
    stored, waiting = stored_tasks(stack.server.data_dir), ready_messages(stack.broker_url, stack.capped)
    with NormalClient(stack.server.address) as normal:
        error = attack()
    normal.check()
    assert stored_tasks(stack.server.data_dir) == stored, "a refused request left a task in the store"
    assert ready_messages(stack.broker_url, stack.capped) == waiting, "a refused request enqueued a message"
    return error


def test_an_oversized_message_is_refused_resource_exhausted(stack):
    five_mib = b"1" * (5 * 1024 * 1024)  # over server.max_message_bytes (4 MiB)
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "test.echo", five_mib, stack.capped))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "larger than max" in error.details(), error.details()
    assert error_reason(error) is None, "refused by gRPC itself, before qm-server read it"


def test_100000_ids_in_one_stream_are_refused_invalid_argument(stack):
    ids = [str(uuid.uuid4()) for _ in range(100_000)]  # 3.8 MB: under the message limit

    def attack() -> grpc.RpcError:
        request = task_queue_pb2.StreamTaskResultsRequest(task_ids=ids)
        with pytest.raises(grpc.RpcError) as refused:
            list(stack.stub.StreamTaskResults(iter([request]), timeout=CALL_TIMEOUT_S))
        return refused.value

    error = refused_leaves_nothing(stack, attack)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert "server.max_stream_ids" in error.details() and "10000" in error.details(), error.details()
    assert error_reason(error) == "INVALID_FIELD"
    assert stream_ids_limit(error) == 10_000, "the cap travels in the error, for clients to follow that many"


def test_an_unknown_queue_is_refused_and_never_declared(stack):
    unknown = unique("not-allowed")
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "math", b"1 + 1", unknown))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert "queue" in error.details() and "server.queues" in error.details(), error.details()
    assert error_reason(error) == "INVALID_FIELD"
    assert ready_messages(stack.broker_url, unknown) is None, "an unknown queue became a RabbitMQ queue"


def test_a_queue_name_with_a_trailing_newline_is_refused(stack):
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "math", b"1 + 1", stack.capped + "\n"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith("queue:"), error.details()
    assert ready_messages(stack.broker_url, stack.capped + "\n") is None


def test_deeply_nested_json_is_refused_invalid_argument(stack):
    nested = b"[" * 200_000 + b"]" * 200_000  # 400 kB, under server.max_payload_bytes
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "test.json_check", nested, stack.capped))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert "payload" in error.details() and "nested" in error.details(), error.details()


def test_a_slow_validator_is_cut_off_without_stalling_others(stack):
    slow = json.dumps({"validate_sleep_s": 5 * VALIDATE_BUDGET_S}).encode()
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "test.json_check", slow, stack.capped))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert "server.validate_timeout_s" in error.details(), error.details()


def test_a_10000_character_expression_is_answered_without_stalling_others(stack):
    expression = ("1+" * 5000)[:9_999] + "1"  # 10,000 characters, nested 5,000 deep
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "math", expression.encode(),
                                                               stack.capped))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith("payload:"), error.details()


def test_limits_over_the_server_maxima_are_refused(stack):
    too_long = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "math", b"1", stack.capped,
                                                                  timeout_s=120.0))
    assert too_long.code() is grpc.StatusCode.INVALID_ARGUMENT, too_long
    assert "server.max_task_timeout_s" in too_long.details(), too_long.details()
    too_many = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "math", b"1", stack.capped,
                                                                  max_retries=50))
    assert too_many.code() is grpc.StatusCode.INVALID_ARGUMENT, too_many
    assert "server.max_retries" in too_many.details(), too_many.details()


def test_a_4_mib_result_fails_its_task_and_the_worker_goes_on(stack):
    with qm.Client(stack.server.address) as client, NormalClient(stack.server.address) as normal:
        big = client.submit("test.big_result", str(4 * 1024 * 1024), queue=stack.worked)
        [final] = list(client.results([big], timeout_s=120))
        assert final.state == "FAILED", final
        assert "worker.max_result_bytes" in final.error and "4194304 bytes" in final.error, final.error
        assert client.result(client.submit("math", "6 * 7", queue=stack.worked), timeout_s=120) == "42"
    normal.check()
    assert stack.worker.alive()


def test_a_full_queue_refuses_resource_exhausted_and_stores_nothing(stack):
    """RabbitMQ counts ready messages; a quorum queue takes one past its x-max-length
    before it refuses (checked on a RabbitMQ 3.10 node: 6 of 5 accepted, classic 5)."""
    request = task_queue_pb2.SubmitTaskRequest(type="test.echo", payload=b"fill", queue=stack.capped)
    accepted = []
    for _ in range(QUEUE_CAP + 2):
        try:
            accepted.append(stack.stub.SubmitTask(request, timeout=CALL_TIMEOUT_S).task_id)
        except grpc.RpcError as full:
            assert full.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, full
            break
    assert QUEUE_CAP <= len(accepted) <= QUEUE_CAP + 1, accepted
    assert ready_messages(stack.broker_url, stack.capped) == len(accepted)
    error = refused_leaves_nothing(stack, lambda: submit_error(stack.stub, "test.echo", b"one more", stack.capped))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "broker.max_queue_length" in error.details(), error.details()
    assert error_reason(error) == "QUEUE_FULL"
