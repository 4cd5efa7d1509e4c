"""AckBatcher on the in-memory broker: in-order runs go out as one `multiple` ack, and a
`multiple` ack never covers a delivery whose outcome is not yet confirmed."""
from __future__ import annotations

import asyncio

from qm.broker.base import Delivery
from qm.broker.memory import MemoryBroker
from qm.worker.acks import AckBatcher
from tests.unit.aio import run, within

QUEUE = "work"


async def consuming(count: int) -> tuple[MemoryBroker, list[Delivery]]:
    """A broker whose queue held `count` messages, all delivered to one consumer."""
    broker = MemoryBroker()
    await broker.connect()
    await broker.declare_queue(QUEUE)
    await broker.declare_exchange("x", "direct")
    await broker.bind_queue(QUEUE, "x", QUEUE)
    for n in range(count):
        await broker.publish("x", QUEUE, str(n).encode())
    deliveries: list[Delivery] = []
    all_in = asyncio.Event()

    def on_delivery(delivery: Delivery) -> None:
        deliveries.append(delivery)
        if len(deliveries) == count:
            all_in.set()

    await broker.consume(QUEUE, on_delivery, prefetch=count)
    await within(all_in.wait())
    return broker, deliveries


async def returned_after_disconnect(broker: MemoryBroker) -> list[bytes]:
    """What RabbitMQ would redeliver if the worker died now: every unacked message."""
    await broker.close()
    return sorted(message.body for message in broker._queues[QUEUE])


def test_outcomes_confirmed_in_one_loop_turn_are_acked_with_one_frame():
    async def body():
        broker, deliveries = await consuming(5)
        acks = AckBatcher(broker)
        for delivery in deliveries:
            acks.track(delivery)
        for delivery in reversed(deliveries[:4]):  # finished out of order, same turn
            acks.done(delivery)
        await asyncio.sleep(0)  # the flush runs at the end of this loop turn
        assert acks.frames == 1
        assert await returned_after_disconnect(broker) == [b"4"]  # only the unfinished one
    run(body)


def test_a_running_delivery_is_never_covered_by_a_later_ones_ack():
    async def body():
        broker, deliveries = await consuming(4)
        acks = AckBatcher(broker)
        for delivery in deliveries:
            acks.track(delivery)
        first, second, third, fourth = deliveries
        acks.done(second)
        acks.done(fourth)  # `first` still runs: neither may be acked through it
        await asyncio.sleep(0)
        assert acks.frames == 2  # each on its own: a long task does not hold their prefetch
        acks.nack(third, requeue=True)  # returned: it no longer holds anything back
        assert acks.unsettled == 1
        assert await returned_after_disconnect(broker) == [b"0", b"2"]
    run(body)


def test_a_finished_head_releases_the_run_behind_it_in_one_frame():
    async def body():
        broker, deliveries = await consuming(4)
        acks = AckBatcher(broker)
        for delivery in deliveries:
            acks.track(delivery)
        acks.nack(deliveries[1], requeue=False)  # rejected (undecodable): settled on its own
        await asyncio.sleep(0)
        acks.done(deliveries[0])
        acks.done(deliveries[2])
        acks.done(deliveries[3])
        await asyncio.sleep(0)
        assert acks.frames == 1 and acks.unsettled == 0
        assert await returned_after_disconnect(broker) == []
    run(body)
