"""TaskService: validate → record → publish; events queue → store → hub. MemoryBroker, no worker."""
from __future__ import annotations

import asyncio

import pytest

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.errors import BrokerUnavailable, TaskNotFound, UnknownTaskType, ValidationError
from qm.messages import TaskEvent, TaskMessage
from qm.registry import discover
from qm.server.service import TaskService
from qm.server.store import Store
from qm.states import TaskState
from tests.unit.aio import run, within
from tests.unit.harness import MAX_PAYLOAD_BYTES, WORK_QUEUE, records_until_terminal, server

S = TaskState


async def take_messages(broker: MemoryBroker, queue: str, count: int) -> list[TaskMessage]:
    """Consume `count` messages from a queue (acking them) and decode them."""
    got: asyncio.Queue = asyncio.Queue()
    tag = await broker.consume(queue, got.put_nowait, prefetch=count)
    messages = []
    for _ in range(count):
        delivery = await within(got.get())
        broker.ack(delivery)
        messages.append(TaskMessage.decode(delivery.body))
    await broker.cancel(tag)
    return messages


def test_submit_records_the_task_and_publishes_it(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"1 + 2 * 5")
            assert (record.type, record.queue, record.codec, record.state) == ("math", "default", "text", S.QUEUED)
            assert record.attempts == 0 and record.result is None
            assert (await parts.service.status(record.task_id)) == record == (await parts.store.get(record.task_id))
            assert parts.broker.queue_depth(WORK_QUEUE) == 1
            [message] = await take_messages(parts.broker, WORK_QUEUE, 1)
            assert (message.task_id, message.type, message.payload, message.queue, message.attempt) == \
                (record.task_id, "math", b"1 + 2 * 5", "default", 1)
    run(body)


def test_submit_to_a_named_queue_routes_only_there(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            await parts.service.submit("test.echo", b"a")  # declares the default queue
            record = await parts.service.submit("test.echo", b"b", queue="high.prio")
            assert record.queue == "high.prio"
            assert parts.broker.queue_depth("qm.tasks.high.prio") == 1
            assert parts.broker.queue_depth(WORK_QUEUE) == 1
            [message] = await take_messages(parts.broker, "qm.tasks.high.prio", 1)
            assert message.task_id == record.task_id and message.queue == "high.prio"
    run(body)


def test_task_ids_are_unique(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            ids = {(await parts.service.submit("test.echo", b"x")).task_id for _ in range(20)}
            assert len(ids) == 20 and (await parts.store.count()) == 20
    run(body)


@pytest.mark.parametrize("task_type, payload, queue, error_type, field, text", [
    ("no.such.type", b"1", "", UnknownTaskType, "type", "no.such.type"),
    ("", b"1", "", ValidationError, "type", "missing"),
    ("math", b"1 +", "", ValidationError, "payload", ""),
    ("math", b"1" * (MAX_PAYLOAD_BYTES + 1), "", ValidationError, "payload", f"limit of {MAX_PAYLOAD_BYTES} bytes"),
    ("test.echo", b"\xff\xfe", "", ValidationError, "payload", "text"),
    ("math", b"1", "a b", ValidationError, "queue", "'a b'"),
    ("math", b"1", "x" * 101, ValidationError, "queue", "not a valid queue name"),
])
def test_invalid_submission_is_rejected_and_leaves_no_trace(tmp_path, task_type, payload, queue, error_type,
                                                            field, text):
    async def body():
        async with server(tmp_path) as parts:
            await parts.service.submit("math", b"1")
            before = ((await parts.store.count()), parts.broker.queue_depth(WORK_QUEUE))
            with pytest.raises(error_type) as info:
                await parts.service.submit(task_type, payload, queue)
            assert info.value.field == field and text in str(info.value)
            assert ((await parts.store.count()), parts.broker.queue_depth(WORK_QUEUE)) == before
    run(body)


def test_payload_at_the_limit_is_accepted(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("test.echo", b"x" * MAX_PAYLOAD_BYTES)
            assert (await parts.store.get(record.task_id)) is not None
    run(body)


def test_submit_while_broker_is_down_raises_and_stores_nothing(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            await parts.broker.close()
            with pytest.raises(BrokerUnavailable):
                await parts.service.submit("math", b"1 + 1")
            assert (await parts.store.count()) == 0
            await parts.broker.connect()
            await parts.service.submit("math", b"1 + 1")  # works again once reconnected
            assert (await parts.store.count()) == 1
    run(body)


class RefusingBroker(MemoryBroker):
    """A broker that refuses every task message (as RabbitMQ may nack a publish)."""

    async def publish(self, exchange, routing_key, body, headers=None):
        if exchange == topology.TASKS_EXCHANGE:
            raise BrokerUnavailable("refused")
        await super().publish(exchange, routing_key, body, headers)


def test_refused_publish_leaves_no_stored_task(tmp_path):
    async def body():
        broker = RefusingBroker()
        store = Store(tmp_path / "s.db")
        service = TaskService(discover(), store, broker, max_payload_bytes=MAX_PAYLOAD_BYTES)
        await broker.connect()
        with pytest.raises(BrokerUnavailable, match="refused"):
            await service.submit("math", b"1")
        assert await store.count() == 0
        await store.close()
    run(body)


def test_status_of_unknown_task_raises_task_not_found(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            with pytest.raises(TaskNotFound, match="'nope'"):
                await parts.service.status("nope")
    run(body)


async def publish_event(broker: MemoryBroker, event: TaskEvent | bytes) -> None:
    body = event if isinstance(event, bytes) else event.encode()
    await broker.publish(topology.EVENTS_EXCHANGE, "", body, {})


def test_events_update_the_store_and_reach_followers(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"1 + 2 * 5")
            updates: asyncio.Queue = asyncio.Queue()
            parts.service.hub.follow(record.task_id, updates)
            await publish_event(parts.broker, TaskEvent(record.task_id, "math", "default", 1, S.RUNNING, "w7"))
            running = await within(updates.get())
            assert running.state is S.RUNNING and running.worker == "w7"
            await publish_event(parts.broker, TaskEvent(record.task_id, "math", "default", 1, S.SUCCEEDED, "w7",
                                                        b"11"))
            done = await within(updates.get())
            assert (done.state, done.result) == (S.SUCCEEDED, b"11")
            assert (await parts.service.status(record.task_id)) == done
            parts.service.hub.unfollow(record.task_id, updates)
            assert parts.service.hub.open_follows == 0
    run(body)


def test_duplicate_and_undecodable_events_are_harmless(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            task_id = "submitted-through-another-server"
            updates: asyncio.Queue = asyncio.Queue()
            parts.service.hub.follow(task_id, updates)
            done = TaskEvent(task_id, "test.echo", "default", 1, S.SUCCEEDED, "w2", b"hi")
            await publish_event(parts.broker, b"\xff not an event")
            await publish_event(parts.broker, done)
            await publish_event(parts.broker, done)
            await publish_event(parts.broker, TaskEvent(task_id, "test.echo", "default", 1, S.RUNNING, "w2"))
            [record] = await records_until_terminal(updates, {task_id})
            # the duplicate and the late RUNNING produce no further updates: a later marker arrives first
            marker: asyncio.Queue = asyncio.Queue()
            parts.service.hub.follow("marker", marker)
            await publish_event(parts.broker, TaskEvent("marker", "test.echo", "default", 1, S.FAILED))
            await within(marker.get())
            assert updates.empty()
            assert (record.state, record.result, record.worker) == (S.SUCCEEDED, b"hi", "w2")
            assert (await parts.store.get(task_id)) == record and (await parts.store.count()) == 2
    run(body)
