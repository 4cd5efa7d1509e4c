"""What follows an attempt, on a fake clock: the retry's due time comes from the delay
tier it waits in, and every publish is confirmed before the ack. MemoryBroker."""
from __future__ import annotations

import asyncio

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.messages import TaskEvent, TaskMessage
from qm.metrics import WorkerMetrics
from qm.retry import RetryPolicy
from qm.states import TaskState
from qm.worker.outcomes import Outcomes
from qm.worker.pool import Outcome
from tests.unit.aio import run, within

NOW_S = 1_000_000.0


async def collect(broker: MemoryBroker, queue: str) -> asyncio.Queue:
    got: asyncio.Queue = asyncio.Queue()
    await broker.consume(queue, got.put_nowait, prefetch=0)
    return got


def test_a_retry_waits_in_its_tier_and_is_due_when_the_tier_says_on_the_clock_given():
    async def body():
        broker = MemoryBroker()
        await broker.connect()
        events_queue = await topology.declare_events_queue(broker, "test")
        await topology.declare_work_queue(broker, "default")
        events = await collect(broker, events_queue)
        outcomes = Outcomes(broker, "w1", WorkerMetrics(), clock=lambda: NOW_S)
        await outcomes.ensure_delay_tier(5)
        delayed = await collect(broker, topology.delay_tier_name(5))
        message = TaskMessage("t1", "test.fail", b"", "default", 1, NOW_S - 9, 10.0, 0,
                              RetryPolicy(max_retries=2, backoff_s=5, jitter=False))
        acked = []
        await within(outcomes.settle(message, Outcome(TaskState.FAILED, error="boom"), lambda: acked.append(1)))
        following = TaskMessage.decode((await within(delayed.get())).body)
        assert (following.attempt, following.enqueued_at_s) == (2, NOW_S)
        event = TaskEvent.decode((await within(events.get())).body)
        assert (event.state, event.next_attempt_at_s, event.error) == (TaskState.RETRYING, NOW_S + 5, "boom")
        assert acked == [1]  # after both publishes were confirmed
        await broker.close()

    run(body)
