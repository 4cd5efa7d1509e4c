"""A submit whose confirm was lost with the connection (the message may be in RabbitMQ): the
task is kept, and the client's retry under the same key answers the same id, publishing
the message again, so no task ever runs under an id the server does not know."""
from __future__ import annotations

import asyncio

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.errors import BrokerUnavailable, PublishOutcomeUnknown
from qm.messages import TaskMessage
from qm.registry import discover
from qm.server.service import TaskService
from qm.server.store import Store
from tests.unit.aio import run, within
from tests.unit.harness import MAX_PAYLOAD_BYTES, WORK_QUEUE


class ConfirmLosingBroker(MemoryBroker):
    """Takes the first task message, then fails its publish as a lost connection does."""

    def __init__(self) -> None:
        super().__init__()
        self.lose_next = True

    async def publish(self, exchange, routing_key, body, headers=None):
        await super().publish(exchange, routing_key, body, headers)
        if exchange == topology.TASKS_EXCHANGE and self.lose_next:
            self.lose_next = False
            raise PublishOutcomeUnknown("connection lost before the message was confirmed")


def test_a_retry_after_a_lost_confirm_answers_the_same_task(tmp_path):
    async def body():
        broker = ConfirmLosingBroker()
        store = Store(tmp_path / "s.db")
        service = TaskService(discover(), store, broker, max_payload_bytes=MAX_PAYLOAD_BYTES)
        await broker.connect()
        try:
            await service.submit("math", b"1 + 1", idempotency_key="k1")
            raise AssertionError("the lost confirm must reach the caller (UNAVAILABLE: retry)")
        except BrokerUnavailable:
            pass
        assert await store.count() == 1  # kept: RabbitMQ may hold its message
        retried = await service.submit("math", b"1 + 1", idempotency_key="k1")
        assert [task_id for task_id, _queue, _body in await store.unconfirmed()] == []
        assert broker.queue_depth(WORK_QUEUE) == 2  # the same task, twice: a harmless duplicate
        got: asyncio.Queue = asyncio.Queue()
        await broker.consume(WORK_QUEUE, got.put_nowait, prefetch=2)
        ids = {TaskMessage.decode((await within(got.get())).body).task_id for _ in range(2)}
        assert ids == {retried.task_id}
        await store.close()
    run(body)
