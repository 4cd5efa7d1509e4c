"""RabbitMQBroker over a list of nodes, against the session's real RabbitMQ node and ports
where nothing listens: the first node that answers is used, in list order; with none, the
error names every node and the setting; x-quorum-initial-group-size goes on quorum queues.
(The failover of live processes on a real 3-node cluster: tests/cluster.)"""
from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from qm.broker import topology
from qm.broker.rabbitmq import RabbitMQBroker
from qm.errors import BrokerRefused, BrokerUnavailable, ConfigError
from qm.testing.rabbitmq import free_port

pytestmark = pytest.mark.rabbitmq


def _closed_url() -> str:
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"


def test_the_first_node_that_answers_is_used(rabbitmq):
    async def body():
        broker = RabbitMQBroker([_closed_url(), rabbitmq.url, _closed_url()])
        try:
            await broker.connect(first_attempt_timeout_s=30)
            assert broker.connected and broker.node == f"127.0.0.1:{rabbitmq.amqp_port}"
            assert broker.node_count == 3  # a drain waits for copies only where other nodes exist
            queue = f"test.nodes.{uuid.uuid4().hex[:8]}"
            await broker.declare_queue(queue)
            await broker.publish("", queue, b"hello", {})  # returns once confirmed
            assert await broker.queue_size(queue) == 1
            await broker.delete_queue(queue)
        finally:
            await broker.close()
    asyncio.run(body())


def test_with_no_node_answering_the_error_names_every_node():
    async def body():
        urls = [_closed_url(), _closed_url()]
        broker = RabbitMQBroker(urls, reconnect_max_delay_s=0.5)
        try:
            await broker.connect(first_attempt_timeout_s=1)
            assert not broker.connected
            with pytest.raises(BrokerUnavailable) as err:
                await broker.publish("", "nowhere", b"x", {})
            message = str(err.value)
            assert all(url.split("@")[1].split("/")[0] in message for url in urls), message
            assert "broker.urls" in message
        finally:
            await broker.close()
    asyncio.run(body())


def test_the_keeper_backs_off_only_after_every_node_failed_in_a_round(caplog):
    """Failing over costs no backoff: the next node is tried at once; the pause comes after
    a whole round of the list failed."""
    caplog.set_level(logging.WARNING, logger="qm.broker.rabbitmq")

    async def body():
        broker = RabbitMQBroker([_closed_url() for _ in range(3)], reconnect_max_delay_s=0.5)
        try:
            await broker.connect(first_attempt_timeout_s=0.0)
            for _ in range(200):  # 4 attempts: bounded by the loop, not by time
                if len(attempts()) >= 4:
                    break
                await asyncio.sleep(0.05)
        finally:
            await broker.close()

    def attempts() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot connect")]

    asyncio.run(body())
    first_round = attempts()[:3]
    assert [line.endswith(" next") for line in first_round] == [True, True, False], first_round
    assert "retrying in" in first_round[2]


def test_quorum_queues_get_the_initial_group_size(rabbitmq):
    """RabbitMQ takes at most as many members as it has nodes (one here), and keeps the
    setting as part of the queue's identity: declaring it without is refused."""
    async def body():
        queue = f"test.nodes.q.{uuid.uuid4().hex[:8]}"
        sized = RabbitMQBroker(rabbitmq.url, quorum_initial_group_size=3)
        plain = RabbitMQBroker(rabbitmq.url)
        try:
            await sized.connect(first_attempt_timeout_s=30)
            await plain.connect(first_attempt_timeout_s=30)
            await sized.declare_queue(queue, {"x-queue-type": "quorum"})
            with pytest.raises(BrokerRefused) as err:
                await plain.declare_queue(queue, {"x-queue-type": "quorum"})
            assert err.value.code == 406 and "x-quorum-initial-group-size" in err.value.text
        finally:
            await sized.delete_queue(queue)
            await sized.close()
            await plain.close()
    asyncio.run(body())


def test_a_server_queue_of_the_other_type_is_refused_with_the_way_out(rabbitmq):
    """broker.server_queue_type changed to quorum on an installation whose events queue is
    classic: RabbitMQ cannot change a queue's type; the server is told which queue and what
    to do, not a raw PRECONDITION_FAILED."""
    async def body():
        server_id = f"test-nodes-{uuid.uuid4().hex[:8]}"
        broker = RabbitMQBroker(rabbitmq.url)
        try:
            await broker.connect(first_attempt_timeout_s=30)
            queue = await topology.declare_events_queue(broker, server_id, "classic")
            with pytest.raises(ConfigError) as err:
                await topology.declare_events_queue(broker, server_id, "quorum")
            assert err.value.path == "broker.server_queue_type"
            assert f"rabbitmqctl delete_queue {queue}" in str(err.value)
            await broker.delete_queue(queue)
            await topology.declare_events_queue(broker, server_id, "quorum")  # once deleted: fine
            await broker.delete_queue(queue)
        finally:
            await broker.close()
    asyncio.run(body())
