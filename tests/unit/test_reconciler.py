"""The reconciler publishes again the tasks whose message RabbitMQ lost, from the store's
copy, and leaves alone every task that is merely waiting. MemoryBroker, real store; the
messages are "lost" by taking them out of the broker's queues by hand."""
from __future__ import annotations

from qm.broker import topology
from qm.broker.migrate import migrate_legacy_delay_tiers
from qm.messages import TaskEvent, TaskMessage
from qm.states import TaskState
from tests.unit.aio import run
from tests.unit.harness import WORK_QUEUE, server
from tests.unit.test_service import take_messages

S = TaskState
#: The reconciler's grace in these tests; sweeps are run at explicit times, not waited for.
AFTER_S = 60.0


async def apply(parts, task_id: str, state: TaskState, attempt: int, at_s: float, **fields) -> None:
    event = TaskEvent(task_id, "math", "default", attempt, state, "w1", at_s=at_s, **fields)
    await parts.service.events.apply([event])


def test_a_retry_whose_message_was_lost_is_published_again_as_its_next_attempt(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"1 + 1")
            await take_messages(parts.broker, WORK_QUEUE, 1)  # a worker took attempt 1 ...
            start = record.created_at
            await apply(parts, record.task_id, S.RUNNING, 1, start + 1)
            await apply(parts, record.task_id, S.RETRYING, 1, start + 2, next_attempt_at_s=start + 7)
            # ... and the delayed attempt 2 vanished with a broker restart: no message anywhere.
            reconciler = parts.service.reconciler
            assert await reconciler.sweep(now_s=start + 7 + AFTER_S - 1) == 0  # not overdue yet
            assert await reconciler.sweep(now_s=start + 7 + AFTER_S + 1) == 1
            [message] = await take_messages(parts.broker, WORK_QUEUE, 1)
            assert (message.task_id, message.attempt, message.payload) == (record.task_id, 2, b"1 + 1")
            # Published once per grace period, not at every sweep.
            assert await reconciler.sweep(now_s=start + 7 + AFTER_S + 2) == 0
            assert parts.service.metrics.reconciled.labels("RETRYING")._value.get() == 1
    run(body)


def test_overdue_retries_waiting_behind_a_backlog_are_left_alone(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"1 + 1")
            await take_messages(parts.broker, WORK_QUEUE, 1)
            start = record.created_at
            await apply(parts, record.task_id, S.RUNNING, 1, start + 1)
            await apply(parts, record.task_id, S.RETRYING, 1, start + 2, next_attempt_at_s=start + 3)
            await parts.service.submit("math", b"2 + 2")  # the work queue holds a ready message
            assert await parts.service.reconciler.sweep(now_s=start + 3 + AFTER_S * 10) == 0
            assert parts.broker.queue_depth(WORK_QUEUE) == 1
    run(body)


def test_a_task_running_past_its_time_limit_is_published_again(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"3 * 3", timeout_s=10)
            await take_messages(parts.broker, WORK_QUEUE, 1)
            start = record.created_at
            await apply(parts, record.task_id, S.RUNNING, 1, start + 1, timeout_s=10)
            reconciler = parts.service.reconciler
            assert await reconciler.sweep(now_s=start + 1 + 10 + AFTER_S - 1) == 0
            assert await reconciler.sweep(now_s=start + 1 + 10 + AFTER_S + 1) == 1
            [message] = await take_messages(parts.broker, WORK_QUEUE, 1)
            assert (message.task_id, message.attempt) == (record.task_id, 1)
    run(body)


def test_a_queued_task_missing_from_its_empty_queue_is_published_again(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"4 * 4")
            reconciler = parts.service.reconciler
            # Its message is in the queue: nothing to do, however old.
            assert await reconciler.sweep(now_s=record.created_at + AFTER_S * 10) == 0
            await take_messages(parts.broker, WORK_QUEUE, 1)  # gone without a trace
            assert await reconciler.sweep(now_s=record.created_at + AFTER_S + 1) == 1
            [message] = await take_messages(parts.broker, WORK_QUEUE, 1)
            assert message.task_id == record.task_id
    run(body)


def test_finished_tasks_and_their_stored_messages_are_left_alone(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"5 * 5")
            await take_messages(parts.broker, WORK_QUEUE, 1)
            assert (await parts.store.message(record.task_id)) is not None
            await apply(parts, record.task_id, S.RUNNING, 1, record.created_at + 1, timeout_s=1)
            await apply(parts, record.task_id, S.SUCCEEDED, 1, record.created_at + 2, result=b"25")
            assert (await parts.store.message(record.task_id)) is None  # only unfinished tasks keep a copy
            assert await parts.service.reconciler.sweep(now_s=record.created_at + AFTER_S * 100) == 0
            assert parts.broker.queue_depth(WORK_QUEUE) == 0
    run(body)


def test_legacy_wait_queues_are_drained_into_their_delay_tiers_and_deleted(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            broker = parts.broker
            legacy = topology.legacy_wait_tier_name(5)
            await broker.declare_exchange(legacy, "fanout")
            await broker.declare_queue(legacy, {"x-queue-type": "classic", "x-message-ttl": 5000,
                                                "x-dead-letter-exchange": topology.TASKS_EXCHANGE})
            await broker.bind_queue(legacy, legacy)
            waiting = [TaskMessage(f"task-{n}", "math", b"1", "default", 2, 0.0, 10.0, 0) for n in range(3)]
            for message in waiting:
                await broker.publish(legacy, message.queue, message.encode(), message.headers())
            assert await migrate_legacy_delay_tiers(broker, [1, 5]) == 3
            assert await broker.queue_size(legacy) is None  # deleted
            moved = await take_messages(broker, topology.delay_tier_name(5), 3)
            assert sorted(message.task_id for message in moved) == [message.task_id for message in waiting]
            assert await migrate_legacy_delay_tiers(broker, [1, 5]) == 0  # nothing left to do
    run(body)
