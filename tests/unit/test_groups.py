"""A group's callback is made once by the store and published through the unconfirmed
path: RabbitMQ away at that moment, or the server dying before the publish, leaves it
stored unconfirmed, and the next start publishes it (TaskService over MemoryBroker and a
real SQLite store; the same over real processes is in tests/faults/test_group_faults.py)."""
from __future__ import annotations

import asyncio
import json

import pytest

from qm.broker.memory import MemoryBroker
from qm.errors import ValidationError
from qm.messages import TaskEvent, TaskMessage
from qm.registry import discover
from qm.server.group_callback import callback_payload
from qm.server.service import TaskService
from qm.server.store import Store
from qm.server.store_api import TaskRecord
from qm.server.submission import Submission
from qm.states import TaskState
from tests.unit.aio import run, within
from tests.unit.harness import MAX_PAYLOAD_BYTES

WORK_QUEUE = "qm.tasks.default"


def service_on(path, broker: MemoryBroker) -> TaskService:
    return TaskService(registry=discover(), store=Store(path), broker=broker, max_payload_bytes=MAX_PAYLOAD_BYTES)


def depth(broker: MemoryBroker, queue: str) -> int:
    """Messages ready in a queue; 0 for one not declared yet (nothing ever published to it)."""
    return broker.queue_depth(queue) if queue in broker._queues else 0


def finished(task_id: str, result: bytes) -> TaskEvent:
    return TaskEvent(task_id, "math", "default", 1, TaskState.SUCCEEDED, "w1", result)


async def drain(broker: MemoryBroker, queue: str) -> list[TaskMessage]:
    """Every message waiting in the queue (consumed and acked)."""
    got: list[TaskMessage] = []
    depth = broker.queue_depth(queue)

    def take(delivery) -> None:
        got.append(TaskMessage.decode(delivery.body))
        broker.ack(delivery)

    tag = await broker.consume(queue, take, prefetch=max(depth, 1))

    async def all_taken() -> None:
        while len(got) < depth:
            await asyncio.sleep(0.01)

    await within(all_taken())
    await broker.cancel(tag)
    return got


def test_a_callback_left_unpublished_by_a_crash_is_published_at_the_next_start(tmp_path):
    async def scenario() -> None:
        broker = MemoryBroker()
        await broker.connect()
        first = service_on(tmp_path / "store.db", broker)
        group, member_ids = await first.groups.submit(
            [Submission("math", b"1 + 1"), Submission("math", b"2 * 3")], Submission("math", b"0"))
        assert [message.task_id for message in await drain(broker, WORK_QUEUE)] == member_ids
        await first.events.apply([finished(member_ids[0], b"2")])
        broker._drop_connection()  # RabbitMQ goes away as the last member finishes ...
        await first.events.apply([finished(member_ids[1], b"6")])
        callback: TaskRecord | None = await first.store.get(group.callback_task_id)
        assert callback is not None and callback.state is TaskState.QUEUED
        assert [row[0] for row in await first.store.unconfirmed()] == [group.callback_task_id]
        for task in list(first.events._background._tasks):  # ... and the server dies before publishing
            task.cancel()
        await first.store.close()

        again = MemoryBroker()
        await again.connect()
        restarted = service_on(tmp_path / "store.db", again)
        await restarted.start_events("test")
        try:
            await within(_until(lambda: depth(again, WORK_QUEUE) == 1))
            [message] = await drain(again, WORK_QUEUE)
            assert message.task_id == group.callback_task_id and message.type == "math"
            document = json.loads(message.payload)
            assert document["results"] == ["2", "6"] and document["payload"] == "0"
            assert document["task_ids"] == member_ids and document["failures"] == []
            # A replayed copy of the last member's event makes no second callback.
            await restarted.events.apply([finished(member_ids[1], b"6")])
            assert depth(again, WORK_QUEUE) == 0 and await restarted.store.unconfirmed() == []
        finally:
            await restarted.stop_events()
            await restarted.store.close()

    run(scenario)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_bad_groups_are_refused_before_anything_is_stored(tmp_path):
    async def scenario() -> None:
        broker = MemoryBroker()
        await broker.connect()
        service = service_on(tmp_path / "store.db", broker)
        cases = [
            ([], None, "items"),
            ([Submission("math", b"1"), Submission("math", b"1 +")], None, "items[1].payload"),
            ([Submission("math", b"1", idempotency_key="k")], None, "items[0].idempotency_key"),
            ([Submission("math", b"1")], Submission("no.such.type", b""), "then.type"),
            ([Submission("math", b"1")], Submission("math", b"1", delay_s=5.0), "then.delay_s"),
            ([Submission("math", b"1")] * 1001, None, "items"),
        ]
        for items, then, field in cases:
            with pytest.raises(ValidationError) as caught:
                await service.groups.submit(items, then)
            assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")
        assert await service.store.count() == 0 and depth(broker, WORK_QUEUE) == 0
        await service.store.close()

    run(scenario)


def test_the_callback_document_leaves_out_results_past_its_limit():
    members = [TaskRecord.queued(f"m{i}", "math", "default", "text", 0.0) for i in range(3)]
    members = [TaskRecord(**{**m.__dict__, "state": TaskState.SUCCEEDED, "result": b"x" * 100}) for m in members]
    members[2] = TaskRecord(**{**members[2].__dict__, "state": TaskState.CANCELLED, "error": "cancelled by request"})

    small = json.loads(callback_payload("g", None, members))
    assert small["results"] == ["x" * 100, "x" * 100, None] and not small["results_omitted"]
    big = json.loads(callback_payload("g", None, members, max_bytes=200))
    assert big["results"] == [None, None, None] and big["results_omitted"]
    assert big["failures"] == [{"index": 2, "task_id": "m2", "state": "CANCELLED", "error": "cancelled by request"}]
    assert big["task_ids"] == ["m0", "m1", "m2"] and (big["succeeded"], big["failed"]) == (2, 1)


def test_concurrent_submits_of_one_key_make_one_group(tmp_path):
    async def scenario() -> None:
        broker = MemoryBroker()
        await broker.connect()
        service = service_on(tmp_path / "store.db", broker)
        items = [Submission("math", b"1"), Submission("math", b"2")]
        outcomes = await asyncio.gather(*(service.groups.submit(items, None, "one-key") for _ in range(3)))
        assert len({group.group_id for group, _ids in outcomes}) == 1
        assert len({tuple(ids) for _group, ids in outcomes}) == 1
        assert await service.store.count() == 2 and depth(broker, WORK_QUEUE) == 2
        await service.store.close()

    run(scenario)
