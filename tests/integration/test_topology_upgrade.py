"""A RabbitMQ left by a version before 0.2 (classic `qm.wait.<N>s` delay queues, quorum work
queues without at-least-once dead-lettering) is taken over at start-up: no raw
PRECONDITION_FAILED, and no waiting retry lost."""
from __future__ import annotations

import pika

import qm
from qm.broker import topology
from qm.messages import TaskMessage
from qm.retry import RetryPolicy
from tests.processes import wait_until

#: A tier long enough that the moved message is still waiting when the test looks.
TIER_S = 1800
RESULT_TIMEOUT_S = 60.0


def channel(url: str):
    return pika.BlockingConnection(pika.URLParameters(url)).channel()


def ready(url: str, queue: str) -> int | None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        connection.close()


def test_legacy_delay_queue_is_drained_into_its_quorum_tier_and_deleted(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    legacy, successor = topology.legacy_wait_tier_name(TIER_S), topology.delay_tier_name(TIER_S)
    launcher.track_queue(rabbitmq.url, successor)
    setup = channel(rabbitmq.url)
    setup.exchange_declare(topology.TASKS_EXCHANGE, "direct", durable=True)
    setup.exchange_declare(legacy, "fanout", durable=True)
    setup.queue_declare(legacy, durable=True, arguments={
        "x-queue-type": "classic", "x-message-ttl": TIER_S * 1000, "x-dead-letter-exchange": topology.TASKS_EXCHANGE})
    setup.queue_bind(legacy, legacy)
    waiting = TaskMessage("legacy-retry-1", "math", b"1 + 1", queue, 2, 0.0, 10.0, 0, RetryPolicy(max_retries=3))
    setup.confirm_delivery()
    setup.basic_publish(legacy, queue, waiting.encode(), pika.BasicProperties(delivery_mode=2,
                                                                                headers=waiting.headers()))
    setup.connection.close()

    server = launcher.server(rabbitmq.url)
    server.wait_for_line(rf"migrated the legacy delay queue {legacy}: 1 waiting retries moved", 30.0)
    assert ready(rabbitmq.url, legacy) is None, "the legacy queue is still there"
    assert ready(rabbitmq.url, successor) == 1, server.logs

    check = channel(rabbitmq.url)
    _method, _properties, body = check.basic_get(successor, auto_ack=True)
    check.connection.close()
    assert TaskMessage.decode(body) == waiting


def test_legacy_quorum_work_queue_is_used_as_it_is_with_a_warning(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    name = topology.work_queue_name(queue)
    setup = channel(rabbitmq.url)
    setup.queue_declare(name, durable=True, arguments={
        "x-queue-type": "quorum", "x-dead-letter-exchange": topology.DEAD_EXCHANGE, "x-delivery-limit": 20})
    setup.connection.close()

    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    worker.wait_for_line(rf"work queue {name} was declared by an older version", 30.0)
    with qm.Client(server.address) as client:
        task_id = client.submit("math", "6 * 7", queue=queue)
        assert client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "42"
    wait_until(lambda: "older version" in server.stderr, 30.0, message="the server's warning about the queue")
    assert "PRECONDITION_FAILED" not in server.stderr + worker.stderr


def test_a_work_queue_of_another_type_stops_the_worker_with_the_way_out(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    name = topology.work_queue_name(queue)
    setup = channel(rabbitmq.url)
    # As a worker with broker.queue_type: classic declared it; this one has the default, quorum.
    setup.queue_declare(name, durable=True, arguments={"x-queue-type": "classic",
                                                       "x-dead-letter-exchange": topology.DEAD_EXCHANGE})
    setup.connection.close()

    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue, wait_ready=False)
    assert worker.wait(60.0) == 2, worker.logs
    assert f"{name} in RabbitMQ is a classic queue, but broker.queue_type is 'quorum'" in worker.stderr, worker.logs
    assert f"rabbitmqctl delete_queue {name}" in worker.stderr
    assert "Traceback" not in worker.stderr
