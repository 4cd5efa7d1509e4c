"""Task events in packs (qm/worker/event_packs.py): an event handed over while another
awaits RabbitMQ's confirm waits, and the waiting ones go out as one message; a lone event
goes out at once, unpacked. MemoryBroker whose confirms are held until a test lets them go."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.errors import BrokerUnavailable
from qm.messages import TaskEvent
from qm.metrics import WorkerMetrics
from qm.protocol import Header
from qm.states import TaskState
from qm.task_progress import Progress
from qm.worker.event_packs import EventPacks
from tests.unit.aio import run, within

S = TaskState


class HeldConfirms(MemoryBroker):
    """Routes each publish at once; its confirm comes when the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.confirms: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def publish(self, exchange, routing_key, body, headers=None) -> None:
        await super().publish(exchange, routing_key, body, headers)
        confirm = asyncio.get_running_loop().create_future()
        self.confirms.put_nowait(confirm)
        await confirm

    async def confirm_next(self) -> None:
        (await within(self.confirms.get())).set_result(None)


async def tapped(broker: MemoryBroker) -> asyncio.Queue:
    """Every message on qm.events from now on, as (headers, events)."""
    await broker.declare_exchange(topology.EVENTS_EXCHANGE, "fanout")
    queue = await topology.declare_events_queue(broker, "tap")
    got: asyncio.Queue = asyncio.Queue()

    def on_delivery(delivery) -> None:
        got.put_nowait((delivery.headers, TaskEvent.decode_all(delivery.body)))
        broker.ack(delivery)

    await broker.consume(queue, on_delivery, prefetch=0)
    return got


def outcome(task_id: str, result: bytes = b"11") -> TaskEvent:
    return TaskEvent(task_id, "math", "default", 1, S.SUCCEEDED, "w1", result, at_s=1.0)


@contextlib.asynccontextmanager
async def rig(broker: MemoryBroker | None = None, **options):
    """(broker, the messages on qm.events as (headers, events), EventPacks(broker, **options));
    the broker holds its confirms unless another is given."""
    broker = broker or HeldConfirms()
    await broker.connect()
    messages = await tapped(broker)
    try:
        yield broker, messages, EventPacks(broker, **options)
    finally:
        await broker.close()


async def started(packs: EventPacks, event: TaskEvent) -> asyncio.Task:
    """`packs.publish(event)` in a task of its own, once it has handed the event over."""
    task = asyncio.create_task(packs.publish(event))
    await asyncio.sleep(0)  # it runs up to its first wait: published, or waiting its turn
    return task


def test_events_waiting_behind_a_confirm_go_out_as_one_pack_in_order_and_each_caller_waits_for_its_confirm():
    async def body():
        async with rig() as (broker, messages, packs):
            first = await started(packs, outcome("t1"))
            headers, events = await within(messages.get())
            assert [e.task_id for e in events] == ["t1"] and headers[Header.TASK_ID] == "t1"  # a plain event
            later = [await started(packs, outcome(f"t{n}")) for n in (2, 3, 4)]
            assert messages.empty()  # they wait for t1's confirm
            await broker.confirm_next()
            await within(first)
            headers, events = await within(messages.get())
            assert [e.task_id for e in events] == ["t2", "t3", "t4"] and headers[Header.STATE] == "PACKED"
            assert events[0] == outcome("t2")
            assert not any(task.done() for task in later)  # not before the pack is confirmed
            await broker.confirm_next()
            await within(asyncio.gather(*later))

    run(body)


def test_events_handed_over_in_one_loop_turn_share_a_message():
    """One run's outcome and the next run's start come in the same turn: one message."""
    async def body():
        async with rig() as (broker, messages, packs):
            both = asyncio.gather(packs.publish(outcome("t1")), packs.publish(outcome("t2")))
            _headers, events = await within(messages.get())
            assert [e.task_id for e in events] == ["t1", "t2"]
            await broker.confirm_next()
            await within(both)
            assert messages.empty()

    run(body)


def test_the_worker_metric_counts_the_events_in_each_message():
    """qm_worker_events_per_message: a lone event, then a pack of three (sum 4 over 2)."""
    async def body():
        metrics = WorkerMetrics()
        async with rig(on_message=metrics.events_per_message.observe) as (broker, _messages, packs):
            first = await started(packs, outcome("t1"))
            later = [await started(packs, outcome(f"t{n}")) for n in (2, 3, 4)]
            await broker.confirm_next()
            await broker.confirm_next()
            await within(asyncio.gather(first, *later))
            sample = metrics.registry.get_sample_value
            assert (sample("qm_worker_events_per_message_count"), sample("qm_worker_events_per_message_sum")) == (2, 4)
            assert sample("qm_worker_events_per_message_bucket", {"le": "1.0"}) == 1

    run(body)


def test_one_event_at_a_time_goes_out_alone_as_any_server_reads_it():
    async def body():
        async with rig() as (broker, messages, packs):
            for n in range(3):
                task = await started(packs, outcome(f"t{n}"))
                await broker.confirm_next()
                await within(task)
                headers, _events = await within(messages.get())
                assert headers[Header.STATE] == "SUCCEEDED"

    run(body)


def test_with_packing_off_every_event_goes_alone_even_behind_a_confirm():
    async def body():
        async with rig(enabled=False) as (broker, messages, packs):
            tasks = [await started(packs, outcome(f"t{n}")) for n in range(3)]
            for _ in tasks:
                await broker.confirm_next()
            await within(asyncio.gather(*tasks))
            sent = [await within(messages.get()) for _ in tasks]
            assert [[e.task_id for e in events] for _headers, events in sent] == [["t0"], ["t1"], ["t2"]]

    run(body)


def test_a_pack_holds_at_most_max_bytes_and_the_rest_follows_in_the_next():
    async def body():
        async with rig(max_bytes=2500) as (broker, messages, packs):
            tasks = [await started(packs, outcome(f"t{n}", b"x" * 1000)) for n in range(5)]
            for _ in range(3):  # t0 alone, then t1 + t2, then t3 + t4
                await broker.confirm_next()
            await within(asyncio.gather(*tasks))
            sent = [[e.task_id for e in (await within(messages.get()))[1]] for _ in range(3)]
            assert sent == [["t0"], ["t1", "t2"], ["t3", "t4"]]

    run(body)


def test_a_failed_pack_fails_each_of_its_callers_and_the_next_pack_still_goes():
    async def body():
        async with rig() as (broker, messages, packs):
            first = await started(packs, outcome("t1"))
            doomed = [await started(packs, outcome(f"t{n}")) for n in (2, 3)]
            await broker.confirm_next()
            (await within(broker.confirms.get())).set_exception(RuntimeError("channel closed"))  # the pack's
            for task in doomed:
                with pytest.raises(RuntimeError, match="channel closed"):
                    await within(task)
            await within(first)
            after = await started(packs, outcome("t4"))
            await broker.confirm_next()
            await within(after)
            assert [[e.task_id for e in (await within(messages.get()))[1]] for _ in range(3)] == [
                ["t1"], ["t2", "t3"], ["t4"]]

    run(body)


def progress(task_id: str) -> TaskEvent:
    return TaskEvent(task_id, "math", "default", 1, S.RUNNING, "w1", at_s=1.0, progress=Progress(0.5, "half"))


def test_a_progress_report_follows_the_events_waiting_before_it():
    """A task's RUNNING event waiting behind another confirm must reach the servers before
    its first report (they take progress only from a RUNNING task)."""
    async def body():
        async with rig() as (broker, messages, packs):
            busy = await started(packs, outcome("t1"))
            running = await started(packs, TaskEvent("t2", "math", "default", 1, S.RUNNING, "w1", at_s=1.0))
            report = asyncio.create_task(packs.publish_advisory(progress("t2")))
            await asyncio.sleep(0)
            await broker.confirm_next()
            await broker.confirm_next()
            await within(asyncio.gather(busy, running, report))
            sent = [(await within(messages.get()))[1] for _ in range(2)]
            assert [[(e.task_id, e.progress is not None) for e in events] for events in sent] == [
                [("t1", False)], [("t2", False), ("t2", True)]]

    run(body)


def test_a_progress_report_with_nothing_waiting_goes_at_once_and_is_dropped_while_rabbitmq_is_away():
    async def body():
        async with rig(MemoryBroker()) as (broker, messages, packs):
            await within(packs.publish_advisory(progress("t1")))
            headers, [event] = await within(messages.get())
            assert (headers[Header.STATE], event.progress) == ("PROGRESS", Progress(0.5, "half"))
        with pytest.raises(BrokerUnavailable):
            await within(packs.publish_advisory(progress("t1")))

    run(body)
