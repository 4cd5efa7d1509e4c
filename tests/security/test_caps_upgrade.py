"""The length cap on work queues (broker.max_queue_length) meets a RabbitMQ that already
holds work queues: one declared by the previous release (no cap) keeps working, with a
warning naming a policy that caps it; one with another cap is refused with the way out,
never a raw PRECONDITION_FAILED. Real RabbitMQ, qm-server and qm-worker."""
from __future__ import annotations

import grpc
import pika

import qm
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.broker import topology
from tests.processes import wait_until

RESULT_TIMEOUT_S = 60.0


def declare(url: str, name: str, arguments: dict) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        connection.channel().queue_declare(name, durable=True, arguments=arguments)


def test_a_work_queue_of_the_previous_release_is_used_with_a_warning_naming_a_policy(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    name = topology.work_queue_name(queue)
    declare(rabbitmq.url, name, topology.work_queue_arguments("quorum", 5))  # as the previous release did

    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    worker.wait_for_line(rf"work queue {name} was declared by an older version without the length cap", 30.0)
    with qm.Client(server.address) as client:
        assert client.result(client.submit("math", "6 * 7", queue=queue), timeout_s=RESULT_TIMEOUT_S) == "42"
    wait_until(lambda: "rabbitmqctl set_policy" in server.stderr, 30.0, message="the server's warning")
    assert "PRECONDITION_FAILED" not in server.stderr + worker.stderr


def test_a_work_queue_with_another_cap_is_refused_with_the_way_out(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    name = topology.work_queue_name(queue)
    declare(rabbitmq.url, name, topology.work_queue_arguments("quorum", 5, max_length=10))

    server = launcher.server(rabbitmq.url, env={"QM_BROKER__MAX_QUEUE_LENGTH": "20"})
    with grpc.insecure_channel(server.address) as channel:
        request = task_queue_pb2.SubmitTaskRequest(type="math", payload=b"1", queue=queue)
        try:
            task_queue_pb2_grpc.TaskQueueStub(channel).SubmitTask(request, timeout=RESULT_TIMEOUT_S)
        except grpc.RpcError as refused:
            assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION, refused
            assert "broker.max_queue_length" in refused.details() and "delete_queue" in refused.details()
        else:
            raise AssertionError("a submit to a work queue with another cap was accepted")
