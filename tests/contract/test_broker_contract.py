"""The broker contract: one suite, run against MemoryBroker and against RabbitMQBroker.

`BrokerContract` holds every case once; each subclass says how to make its broker and
provides the few hooks a case needs (a second connection to the same broker, a broker
that cannot be reached, the number of ready messages in a queue). No pytest-asyncio:
`run` drives each scenario coroutine with `asyncio.run`, connecting the broker inside
the loop and always closing it. Waits are for conditions, bounded by WAIT_S.

`TestRabbitMQRestarts` adds what only a real server can show: durability and reconnects
across a graceful restart and across SIGKILL of the node. `TestRabbitMQBroker` also shows
what an exclusive consumer does across a network outage (through a `Gate`).
"""
from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from typing import Awaitable, Callable

import pika
import pytest

from qm.broker.base import Broker, Delivery
from qm.broker.memory import MemoryBroker
from qm.broker.rabbitmq import RabbitMQBroker
from qm.errors import BrokerRefused, BrokerUnavailable, ConsumerRefused, QueueFull
from qm.testing.rabbitmq import free_port

#: Bound on every single wait for something to happen.
WAIT_S = 10.0
#: Bound on a whole scenario.
SCENARIO_TIMEOUT_S = 60.0
#: Bound on a scenario that restarts a RabbitMQ node (each start takes a few seconds).
RESTART_SCENARIO_TIMEOUT_S = 180.0


def unique(kind: str) -> str:
    """A name no other test uses (the RabbitMQ node is shared by the whole session)."""
    return f"qm.contract.{kind}.{uuid.uuid4().hex[:12]}"


def bodies(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(count)]


class Inbox:
    """A consumer callback collecting deliveries; `next()` waits for the next one."""

    def __init__(self, broker: Broker | None = None, auto_ack: bool = False) -> None:
        self._broker = broker
        self._auto_ack = auto_ack
        self._arrived: asyncio.Queue[Delivery] = asyncio.Queue()
        self.received: list[Delivery] = []
        self.settled = 0
        self.max_unsettled = 0

    def __call__(self, delivery: Delivery) -> None:
        self.received.append(delivery)
        self.max_unsettled = max(self.max_unsettled, len(self.received) - self.settled)
        if self._auto_ack:
            self.ack(delivery)
        self._arrived.put_nowait(delivery)

    def ack(self, delivery: Delivery) -> None:
        self._broker.ack(delivery)
        self.settled += 1

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self._arrived.get(), WAIT_S)

    async def take(self, count: int) -> list[Delivery]:
        return [await self.next() for _ in range(count)]


Scenario = Callable[[Broker], Awaitable[None]]


async def ack_one_per_turn(inbox: Inbox, held: list[Delivery]) -> None:
    """Ack `held` one delivery per loop turn (about a millisecond apart)."""
    for delivery in held:
        inbox.ack(delivery)
        await asyncio.sleep(0.001)


def assert_each_once_none_redelivered(inbox: Inbox, sent: list[bytes]) -> None:
    """Every message in `sent` reached the consumer once, and none came back redelivered
    (a worker would run such a first delivery alone, as a poison suspect)."""
    redelivered = [d.body for d in inbox.received if d.redelivered]
    assert redelivered == [], f"first deliveries that came back marked redelivered: {redelivered}"
    assert sorted(d.body for d in inbox.received) == sorted(sent)


async def until(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait (bounded) until `condition()` holds; for states no callback announces."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.05)


class BrokerContract:
    """The contract cases; not collected itself (no Test prefix), only via subclasses."""

    # -- hooks provided by each subclass -----------------------------------------------

    def new_broker(self) -> Broker:
        """A fresh, not yet connected broker (called inside the scenario's loop)."""
        raise NotImplementedError

    async def other_connection(self, broker: Broker) -> Broker:
        """A (connected) second client of the same broker that `broker` talks to."""
        raise NotImplementedError

    async def unreachable_broker(self) -> Broker:
        """A broker after connect() was attempted but could not succeed."""
        raise NotImplementedError

    def check_unavailable_message(self, message: str) -> None:
        """Whatever the broker promises about the text of BrokerUnavailable."""

    async def ready_count(self, broker: Broker, queue: str) -> int:
        """Messages waiting in `queue`, not handed to any consumer."""
        raise NotImplementedError

    # -- driver --------------------------------------------------------------------------

    def run(self, scenario: Scenario, timeout_s: float = SCENARIO_TIMEOUT_S) -> None:
        """Run `scenario(broker)` on a fresh loop with a connected broker; always close."""

        async def main() -> None:
            self._brokers: list[Broker] = []
            broker = self.track(self.new_broker())
            try:
                await broker.connect()
                assert broker.connected
                await asyncio.wait_for(scenario(broker), timeout_s)
            finally:
                for opened in reversed(self._brokers):
                    await opened.close()

        asyncio.run(main())

    def track(self, broker: Broker) -> Broker:
        """Close `broker` when the scenario ends."""
        if all(broker is not known for known in self._brokers):
            self._brokers.append(broker)
        return broker

    @staticmethod
    async def direct_queue(broker: Broker, routing_key: str = "work") -> tuple[str, str]:
        """A direct exchange and a queue bound to it under `routing_key`."""
        exchange, queue = unique("direct"), unique("queue")
        await broker.declare_exchange(exchange, "direct")
        await broker.declare_queue(queue)
        await broker.bind_queue(queue, exchange, routing_key)
        return exchange, queue

    @staticmethod
    async def consuming_eight_of(broker: Broker, sent: list[bytes]) -> tuple["Inbox", str, list[Delivery]]:
        """`sent` on a fresh quorum queue, a consumer at prefetch 8, and the 8 it holds."""
        exchange, queue = unique("direct"), unique("quorum")
        await broker.declare_exchange(exchange, "direct")
        await broker.declare_queue(queue, {"x-queue-type": "quorum"})
        await broker.bind_queue(queue, exchange, "work")
        for body in sent:
            await broker.publish(exchange, "work", body)
        inbox = Inbox(broker)
        tag = await broker.consume(queue, inbox, prefetch=8)
        return inbox, tag, await inbox.take(8)

    # -- 1. direct routing --------------------------------------------------------------

    def test_direct_exchange_routes_body_and_headers_by_routing_key(self):
        async def scenario(broker: Broker) -> None:
            exchange, work = await self.direct_queue(broker, "work")
            other = unique("queue")
            await broker.declare_queue(other)
            await broker.bind_queue(other, exchange, "other")
            work_inbox, other_inbox = Inbox(broker, auto_ack=True), Inbox(broker, auto_ack=True)
            await broker.consume(work, work_inbox, prefetch=10)
            await broker.consume(other, other_inbox, prefetch=10)

            headers = {"task-id": "t-42", "attempt": 3, "type": "math.fib", "note": "héllo"}
            body = b"\x00\x01binary\xffpayload"
            await broker.publish(exchange, "other", b"not-for-work", {"k": "v"})
            await broker.publish(exchange, "work", body, headers)

            delivery = await work_inbox.next()
            # The message on the other key would have been queued first: it did not come.
            assert delivery.body == body
            assert delivery.headers == headers
            assert delivery.redelivered is False
            # ... it went to the queue bound under its key instead.
            routed = await other_inbox.next()
            assert (routed.body, routed.headers) == (b"not-for-work", {"k": "v"})

            await broker.publish(exchange, "nobody-listens", b"dropped")
            await broker.publish(exchange, "work", b"sentinel")
            assert (await work_inbox.next()).body == b"sentinel"

        self.run(scenario)

    # -- 2. fanout ----------------------------------------------------------------------

    def test_fanout_exchange_gives_every_bound_queue_one_copy(self):
        async def scenario(broker: Broker) -> None:
            exchange = unique("fanout")
            await broker.declare_exchange(exchange, "fanout")
            queues = [unique("queue") for _ in range(3)]
            inboxes = []
            for queue in queues:
                await broker.declare_queue(queue)
                await broker.bind_queue(queue, exchange)
                inboxes.append(Inbox(broker, auto_ack=True))
                await broker.consume(queue, inboxes[-1], prefetch=10)
            # A second binding of the same queue (another key) must not double deliveries.
            await broker.bind_queue(queues[0], exchange, "also")

            await broker.publish(exchange, "ignored-by-fanout", b"event-1", {"seq": 1})
            await broker.publish(exchange, "", b"event-2", {"seq": 2})
            for inbox in inboxes:
                first, second = await inbox.take(2)
                assert (first.body, first.headers) == (b"event-1", {"seq": 1})
                assert (second.body, second.headers) == (b"event-2", {"seq": 2})

        self.run(scenario)

    # -- 3. prefetch --------------------------------------------------------------------

    def test_prefetch_limits_unacked_deliveries(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("job", 5)
            for body in sent:
                await broker.publish(exchange, "work", body)
            inbox = Inbox(broker)
            await broker.consume(queue, inbox, prefetch=2)

            first, second = await inbox.take(2)
            assert [first.body, second.body] == sent[:2]
            # The other three wait in the queue: the consumer was not handed them.
            assert await self.ready_count(broker, queue) == 3
            assert len(inbox.received) == 2

            inbox.ack(first)
            third = await inbox.next()
            assert third.body == sent[2]
            assert await self.ready_count(broker, queue) == 2
            assert len(inbox.received) == 3

            inbox.ack(second)
            inbox.ack(third)
            rest = await inbox.take(2)
            for delivery in rest:
                inbox.ack(delivery)
            assert [d.body for d in inbox.received] == sent
            assert inbox.max_unsettled == 2

        self.run(scenario)

    def test_raising_prefetch_on_a_running_consumer_delivers_more(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("job", 6)
            for body in sent:
                await broker.publish(exchange, "work", body)
            inbox = Inbox(broker)
            tag = await broker.consume(queue, inbox, prefetch=1)
            first = await inbox.next()
            assert await self.ready_count(broker, queue) == 5

            await broker.set_prefetch(tag, 3)
            more = await inbox.take(2)  # three in hand now, the first still unacked
            assert first.body == sent[0] and all(d.body in sent[1:] for d in more)
            for delivery in [first, *more]:
                inbox.ack(delivery)
            while len(inbox.received) < len(sent):
                inbox.ack(await inbox.next())
            assert sorted(d.body for d in inbox.received) == sorted(sent)

        self.run(scenario)

    def test_lowering_prefetch_while_acking_redelivers_nothing(self):
        """A worker lowers its prefetch when tasks turn long, while it keeps acking. A
        delivery the broker sends the old consumer during the swap is a first delivery all
        the same: it must reach the callback, not come back marked redelivered (a worker
        reads that as "its last holder may have died of it" and runs it alone)."""

        async def scenario(broker: Broker) -> None:
            sent = bodies("job", 60)
            inbox, tag, held = await self.consuming_eight_of(broker, sent)

            # some acks land between the new consumer's start and the old one's cancel-ok,
            # each giving the old consumer room for one more delivery
            await asyncio.gather(broker.set_prefetch(tag, 4), ack_one_per_turn(inbox, held))
            while len({d.body for d in inbox.received}) < len(sent):
                inbox.ack(await inbox.next())
            assert_each_once_none_redelivered(inbox, sent)

        for _ in range(3):  # the swap's window is a few ms: three tries
            self.run(scenario)

    def test_prefetch_changes_that_overlap_end_at_the_last_one(self):
        """A worker may change its prefetch again before the last change is done (tasks
        turning long drop it twice). The consumer ends with the last value, no ack is
        lost on the way, and nothing comes back redelivered."""

        async def scenario(broker: Broker) -> None:
            sent = bodies("job", 40)
            inbox, tag, held = await self.consuming_eight_of(broker, sent)

            async def lower_twice() -> None:
                first = asyncio.ensure_future(broker.set_prefetch(tag, 4))
                await asyncio.sleep(0)
                await asyncio.gather(first, broker.set_prefetch(tag, 2))

            await asyncio.gather(lower_twice(), ack_one_per_turn(inbox, held))
            # what each consumer got during the changes is in hand: ack it all; from then on
            # the consumer holds no more than the last prefetch
            for delivery in inbox.received[inbox.settled:]:
                inbox.ack(delivery)
            await until(lambda: len(inbox.received) - inbox.settled >= 2, "deliveries after the changes")
            await asyncio.sleep(0.5)  # room for any delivery beyond the prefetch to arrive
            assert len(inbox.received) - inbox.settled == 2, (
                f"{len(inbox.received) - inbox.settled} unacked deliveries in hand at prefetch 2")

            def all_in() -> bool:
                return len({d.body for d in inbox.received}) >= len(sent)

            while not all_in():
                for delivery in inbox.received[inbox.settled:]:
                    inbox.ack(delivery)
                await until(lambda: all_in() or len(inbox.received) > inbox.settled, "the next delivery")
            assert_each_once_none_redelivered(inbox, sent)

        self.run(scenario)

    def test_every_consumer_of_a_stream_reads_it_from_the_start(self):
        async def scenario(broker: Broker) -> None:
            exchange, stream = unique("exchange"), unique("stream")
            await broker.declare_exchange(exchange, "fanout")
            await broker.declare_queue(stream, {"x-queue-type": "stream"})
            await broker.bind_queue(stream, exchange)
            early = bodies("early", 3)
            for body in early:
                await broker.publish(exchange, "", body)
            first, second = Inbox(broker, auto_ack=True), Inbox(broker, auto_ack=True)
            await broker.consume(stream, first, 100, {"x-stream-offset": "first"})
            await broker.consume(stream, second, 100, {"x-stream-offset": "first"})
            await broker.publish(exchange, "", b"late")

            for inbox in (first, second):
                assert [d.body for d in await inbox.take(4)] == early + [b"late"]

        self.run(scenario)

    # -- 4. nack ------------------------------------------------------------------------

    def test_nack_requeues_or_drops(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            inbox = Inbox(broker)
            tag = await broker.consume(queue, inbox, prefetch=1)
            await broker.publish(exchange, "work", b"flaky", {"attempt": 1})

            first = await inbox.next()
            assert (first.body, first.redelivered) == (b"flaky", False)
            broker.nack(first, requeue=True)
            again = await inbox.next()
            assert (again.body, again.headers, again.redelivered) == (b"flaky", {"attempt": 1}, True)

            broker.nack(again, requeue=False)
            await broker.publish(exchange, "work", b"sentinel-1")
            after = await inbox.next()
            assert (after.body, after.redelivered) == (b"sentinel-1", False)
            inbox.ack(after)

            await broker.cancel(tag)
            fresh = Inbox(broker, auto_ack=True)
            await broker.consume(queue, fresh, prefetch=10)
            await broker.publish(exchange, "work", b"sentinel-2")
            assert (await fresh.next()).body == b"sentinel-2"
            assert await self.ready_count(broker, queue) == 0

        self.run(scenario)

    # -- 5. storage without consumers ---------------------------------------------------

    def test_messages_published_before_any_consumer_are_kept(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("early", 20)
            for body in sent:
                await broker.publish(exchange, "work", body, {"n": body.decode()})
            # The publishing connection goes away before anyone consumes.
            await broker.close()
            consumer_side = await self.other_connection(broker)
            inbox = Inbox(consumer_side, auto_ack=True)
            await consumer_side.consume(queue, inbox, prefetch=5)
            received = await inbox.take(len(sent))
            assert [d.body for d in received] == sent
            assert all(d.headers == {"n": d.body.decode()} for d in received)
            assert not any(d.redelivered for d in received)

        self.run(scenario)

    # -- 6. unacked deliveries survive the consumer's connection ------------------------

    def test_unacked_deliveries_return_when_connection_closes(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("unacked", 3)
            inbox = Inbox(broker)
            await broker.consume(queue, inbox, prefetch=10)
            for body in sent:
                await broker.publish(exchange, "work", body)
            held = await inbox.take(3)
            assert [d.body for d in held] == sent

            await broker.close()
            assert not broker.connected
            for delivery in held:
                broker.ack(delivery)  # the channel is gone: a no-op, not an error

            other = await self.other_connection(broker)
            again = Inbox(other, auto_ack=True)
            await other.consume(queue, again, prefetch=10)
            returned = await again.take(3)
            assert [d.body for d in returned] == sent
            assert all(d.redelivered for d in returned)

        self.run(scenario)

    # -- 7. competing consumers ---------------------------------------------------------

    def test_two_consumers_share_a_queue(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("shared", 10)
            for body in sent:
                await broker.publish(exchange, "work", body)

            arrivals: asyncio.Queue[tuple[str, Delivery]] = asyncio.Queue()
            await broker.consume(queue, lambda d: arrivals.put_nowait(("a", d)), prefetch=1)
            await broker.consume(queue, lambda d: arrivals.put_nowait(("b", d)), prefetch=1)

            async def next_arrival() -> tuple[str, Delivery]:
                return await asyncio.wait_for(arrivals.get(), WAIT_S)

            # With prefetch 1 each, the first two deliveries go one to each consumer.
            (who1, d1), (who2, d2) = await next_arrival(), await next_arrival()
            assert {who1, who2} == {"a", "b"}
            assert d1.body != d2.body
            got = {who1: [d1.body], who2: [d2.body]}
            broker.ack(d1)
            broker.ack(d2)
            for _ in range(len(sent) - 2):
                who, delivery = await next_arrival()
                got[who].append(delivery.body)
                broker.ack(delivery)

            everything = got["a"] + got["b"]
            assert sorted(everything) == sorted(sent)  # each message exactly once
            assert got["a"] and got["b"]

        self.run(scenario)

    # -- 8. cancel ----------------------------------------------------------------------

    def test_cancel_stops_deliveries_but_outstanding_ones_can_be_acked(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            inbox = Inbox(broker)
            tag = await broker.consume(queue, inbox, prefetch=10)
            await broker.publish(exchange, "work", b"m1")
            await broker.publish(exchange, "work", b"m2")
            outstanding = await inbox.take(2)

            await broker.cancel(tag)
            await broker.publish(exchange, "work", b"after-cancel")
            for delivery in outstanding:
                inbox.ack(delivery)
            assert await self.ready_count(broker, queue) == 1

            # Closing returns whatever is still unacked; the acks above must have held,
            # and the message published after cancel must never have reached `inbox`.
            await broker.close()
            other = await self.other_connection(broker)
            fresh = Inbox(other, auto_ack=True)
            await other.consume(queue, fresh, prefetch=10)
            await other.publish(exchange, "work", b"sentinel")
            first, second = await fresh.take(2)
            assert (first.body, first.redelivered) == (b"after-cancel", False)
            assert second.body == b"sentinel"
            assert [d.body for d in inbox.received] == [b"m1", b"m2"]

        self.run(scenario)

    # -- 9. pipelined publishes ---------------------------------------------------------

    def test_many_publishes_in_flight_all_complete_and_arrive(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("bulk", 500)
            await asyncio.gather(*(broker.publish(exchange, "work", body) for body in sent))
            # Consume only now: everything confirmed is stored; acks from inside the
            # callback (also for deliveries that arrive right as the consumer starts) hold.
            inbox = Inbox(broker, auto_ack=True)
            await broker.consume(queue, inbox, prefetch=50)
            received = [d.body for d in await inbox.take(len(sent))]
            assert len(set(received)) == len(sent)
            assert set(received) == set(sent)
            assert await self.ready_count(broker, queue) == 0

        self.run(scenario)

    # -- 10. idempotent declarations ----------------------------------------------------

    def test_declarations_are_idempotent(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = unique("direct"), unique("queue")
            other = await self.other_connection(broker)
            for client in (broker, broker, other):
                await client.declare_exchange(exchange, "direct")
                await client.declare_queue(queue)
                await client.bind_queue(queue, exchange, "work")

            inbox = Inbox(broker, auto_ack=True)
            await broker.consume(queue, inbox, prefetch=10)
            await broker.publish(exchange, "work", b"once")
            await broker.publish(exchange, "work", b"sentinel")
            assert [d.body for d in await inbox.take(2)] == [b"once", b"sentinel"]

        self.run(scenario)

    def test_a_queue_redeclared_with_other_arguments_is_refused_and_the_connection_stays(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = unique("direct"), unique("queue")
            await broker.declare_exchange(exchange, "direct")
            await broker.declare_queue(queue, {"x-message-ttl": 60_000})
            await broker.bind_queue(queue, exchange, "work")
            with pytest.raises(BrokerRefused) as refused:
                await broker.declare_queue(queue, {"x-message-ttl": 30_000})
            assert refused.value.code == 406 and "x-message-ttl" in refused.value.text
            assert broker.connected
            inbox = Inbox(broker, auto_ack=True)
            await broker.consume(queue, inbox, prefetch=10)
            await broker.publish(exchange, "work", b"still works")
            assert (await inbox.next()).body == b"still works"

        self.run(scenario)

    def test_ack_through_settles_every_earlier_delivery_of_the_consumer_at_once(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("batch", 5)
            for body in sent:
                await broker.publish(exchange, "work", body)
            inbox = Inbox(broker)
            tag = await broker.consume(queue, inbox, prefetch=10)
            got = await inbox.take(5)
            broker.ack(got[3], through=True)  # the first four, in one
            await broker.cancel(tag)
            await broker.close()  # what is still unacked returns to the queue: the fifth only
            other = await self.other_connection(broker)
            again = Inbox(other, auto_ack=True)
            await other.consume(queue, again, prefetch=10)
            assert [d.body for d in await again.take(1)] == [sent[4]]
            await other.publish(exchange, "work", b"sentinel")
            assert (await again.next()).body == b"sentinel"

        self.run(scenario)

    # -- 11. sizes and deletes ----------------------------------------------------------

    def test_queue_size_counts_ready_messages_and_knows_absent_queues(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            assert await broker.queue_size(unique("absent")) is None
            assert await broker.queue_size(queue) == 0
            for body in bodies("m", 3):
                await broker.publish(exchange, "work", body)
            assert await broker.queue_size(queue) == 3
            assert broker.connected

        self.run(scenario)

    def test_delete_queue_if_empty_keeps_a_queue_that_holds_messages(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            await broker.publish(exchange, "work", b"kept")
            with pytest.raises(BrokerRefused):
                await broker.delete_queue(queue, if_empty=True)
            assert await broker.queue_size(queue) == 1
            await broker.delete_queue(queue)
            assert await broker.queue_size(queue) is None
            await broker.delete_queue(queue)  # absent: nothing to do
            await broker.delete_exchange(exchange)
            await broker.delete_exchange(exchange)
            with pytest.raises(BrokerUnavailable):  # the exchange is gone: the publish is refused
                await broker.publish(exchange, "work", b"nowhere")

        self.run(scenario)

    # -- 12. exclusive consumers ---------------------------------------------------------

    def test_an_exclusive_consumer_refuses_every_other_consumer_until_cancelled(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            mine = Inbox(broker, auto_ack=True)
            tag = await broker.consume(queue, mine, prefetch=10, exclusive=True)

            other = await self.other_connection(broker)
            intruder = Inbox(other, auto_ack=True)
            for exclusive in (True, False):
                with pytest.raises(ConsumerRefused) as refused:
                    await other.consume(queue, intruder, prefetch=10, exclusive=exclusive)
                assert refused.value.queue == queue
                assert queue in str(refused.value) and "exclusive" in str(refused.value)

            # The refused client is still fine, and the queue's messages are not split.
            sent = bodies("mine", 5)
            for body in sent:
                await other.publish(exchange, "work", body)
            assert [d.body for d in await mine.take(len(sent))] == sent

            await broker.cancel(tag)  # the queue is free again
            await other.consume(queue, intruder, prefetch=10, exclusive=True)
            await other.publish(exchange, "work", b"for-the-next-owner")
            assert (await intruder.next()).body == b"for-the-next-owner"
            assert [d.body for d in mine.received] == sent
            assert [d.body for d in intruder.received] == [b"for-the-next-owner"]

        self.run(scenario)

    def test_an_exclusive_consumer_is_refused_while_the_queue_has_a_consumer(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            first = Inbox(broker, auto_ack=True)
            await broker.consume(queue, first, prefetch=10)

            other = await self.other_connection(broker)
            with pytest.raises(ConsumerRefused):
                await other.consume(queue, Inbox(other, auto_ack=True), prefetch=10, exclusive=True)
            await other.publish(exchange, "work", b"still-for-the-first")
            assert (await first.next()).body == b"still-for-the-first"

            # The first consumer's connection ends: its consumer with it, so the queue is free.
            await broker.close()
            other = await self.other_connection(broker)
            owner = Inbox(other, auto_ack=True)
            await other.consume(queue, owner, prefetch=10, exclusive=True)
            await other.publish(exchange, "work", b"for-the-owner")
            assert (await owner.next()).body == b"for-the-owner"

        self.run(scenario)

    def test_an_exclusive_consumer_stays_exclusive_when_its_prefetch_changes(self):
        async def scenario(broker: Broker) -> None:
            exchange, queue = await self.direct_queue(broker)
            sent = bodies("job", 4)
            for body in sent:
                await broker.publish(exchange, "work", body)
            inbox = Inbox(broker)
            tag = await broker.consume(queue, inbox, prefetch=1, exclusive=True)
            first = await inbox.next()

            await broker.set_prefetch(tag, 3)
            more = await inbox.take(2)  # three in hand, the first still unacked and ackable
            for delivery in [first, *more]:
                inbox.ack(delivery)
            inbox.ack(await inbox.next())
            assert sorted(d.body for d in inbox.received) == sorted(sent)
            other = await self.other_connection(broker)
            with pytest.raises(ConsumerRefused):
                await other.consume(queue, Inbox(other, auto_ack=True), prefetch=10)

        self.run(scenario)

    # -- 13. not connected --------------------------------------------------------------

    def test_publish_when_unreachable_raises_broker_unavailable(self):
        async def scenario(broker: Broker) -> None:
            unreachable = self.track(await self.unreachable_broker())
            assert not unreachable.connected
            with pytest.raises(BrokerUnavailable) as raised:
                await asyncio.wait_for(unreachable.publish("", "work", b"lost"), WAIT_S)
            self.check_unavailable_message(str(raised.value))

        self.run(scenario)

    def test_publish_after_close_raises_broker_unavailable(self):
        async def scenario(broker: Broker) -> None:
            exchange, _queue = await self.direct_queue(broker)
            await broker.publish(exchange, "work", b"fine")
            await broker.close()
            assert not broker.connected
            with pytest.raises(BrokerUnavailable):
                await asyncio.wait_for(broker.publish(exchange, "work", b"lost"), WAIT_S)

        self.run(scenario)


class TestMemoryBroker(BrokerContract):
    """The contract on the in-memory broker (its state lives in the instance)."""

    def new_broker(self) -> Broker:
        return MemoryBroker()

    async def other_connection(self, broker: Broker) -> Broker:
        if not broker.connected:
            await broker.connect()
        return broker

    async def unreachable_broker(self) -> Broker:
        return MemoryBroker()  # never connected

    async def ready_count(self, broker: Broker, queue: str) -> int:
        return broker.queue_depth(queue)


def _ready_count_blocking(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


@pytest.mark.rabbitmq
class TestRabbitMQBroker(BrokerContract):
    """The contract on the RabbitMQ broker, against the session's RabbitMQ node."""

    @pytest.fixture(autouse=True)
    def _node(self, rabbitmq) -> None:
        self.url = rabbitmq.url
        self.amqp_port = rabbitmq.amqp_port

    def new_broker(self) -> Broker:
        return RabbitMQBroker(self.url)

    async def other_connection(self, broker: Broker) -> Broker:
        other = self.track(RabbitMQBroker(self.url, connection_name="qm-contract-other"))
        await other.connect()
        assert other.connected
        return other

    async def unreachable_broker(self) -> Broker:
        self.closed_port = free_port()
        broker = self.track(RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{self.closed_port}/%2F"))
        await broker.connect(first_attempt_timeout_s=1)
        return broker

    def check_unavailable_message(self, message: str) -> None:
        assert f"127.0.0.1:{self.closed_port}" in message
        assert "unreachable" in message

    async def ready_count(self, broker: Broker, queue: str) -> int:
        return await asyncio.to_thread(_ready_count_blocking, self.url, queue)

    def test_exclusive_consumer_returns_after_an_outage_and_says_loudly_while_taken(self, caplog):
        """Across a network outage the consumer is replayed exclusively; if someone else
        took the queue meanwhile, the replay is refused with an error in the log, the
        client stays disconnected, and it takes the queue back once the other lets go."""
        caplog.set_level(logging.ERROR, logger="qm.broker.rabbitmq")

        def refusals() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.levelno == logging.ERROR and "refused to re-establish the exclusive consumer" in
                    r.getMessage()]

        async def scenario(broker: Broker) -> None:
            gate = Gate(self.amqp_port)
            await gate.open()
            try:
                exchange, queue = await self.direct_queue(broker)
                behind = self.track(RabbitMQBroker(gate.url(), reconnect_max_delay_s=0.5))
                await behind.connect()
                mine = Inbox(behind, auto_ack=True)
                await behind.consume(queue, mine, prefetch=10, exclusive=True)

                # An outage: the old connection's consumer is gone, so the replay is granted.
                await gate.shut()
                await until(lambda: not behind.connected, "the outage noticed")
                await gate.open()
                assert await behind.wait_connected(WAIT_S)
                await broker.publish(exchange, "work", b"after-the-outage")
                assert (await mine.next()).body == b"after-the-outage"
                with pytest.raises(ConsumerRefused):
                    await broker.consume(queue, Inbox(broker), prefetch=10)
                assert refusals() == []

                # Another outage, and meanwhile someone else takes the queue.
                await gate.shut()
                await until(lambda: not behind.connected, "the outage noticed")
                taker = Inbox(broker, auto_ack=True)
                taker_tag = await consume_when_free(broker, queue, taker)
                await gate.open()
                await until(refusals, "the refused replay logged as an error")
                assert queue in refusals()[0]
                assert not behind.connected
                await broker.publish(exchange, "work", b"for-the-taker")
                assert (await taker.next()).body == b"for-the-taker"

                await broker.cancel(taker_tag)  # the other lets go: the keeper's retry gets it back
                assert await behind.wait_connected(WAIT_S)
                await broker.publish(exchange, "work", b"back")
                assert (await mine.next()).body == b"back"
                assert [d.body for d in mine.received] == [b"after-the-outage", b"back"]
            finally:
                await gate.shut()

        self.run(scenario)

    def test_deliveries_sent_to_a_consumer_a_prefetch_change_cancels_reach_the_worker(self):
        """RabbitMQ may deliver to the old consumer of a prefetch swap until it reads the
        Basic.Cancel. Such deliveries reach the callback as first deliveries; they do not
        go back to the queue to return marked redelivered (a worker would run those tasks
        alone, as poison suspects). The gate holds the Cancel while the broker delivers."""

        async def scenario(_broker: Broker) -> None:
            gate = Gate(self.amqp_port)
            await gate.open()
            try:
                broker = self.track(RabbitMQBroker(gate.url(), connection_name="qm-contract-behind-gate"))
                await broker.connect()
                exchange, queue = unique("direct"), unique("quorum")
                await broker.declare_exchange(exchange, "direct")
                await broker.declare_queue(queue, {"x-queue-type": "quorum"})
                await broker.bind_queue(queue, exchange, "work")
                inbox = Inbox(broker)
                tag = await broker.consume(queue, inbox, prefetch=3)

                gate.hold_at(pika.spec.Basic.Cancel.INDEX >> 16, pika.spec.Basic.Cancel.INDEX & 0xFFFF)
                lowering = asyncio.ensure_future(broker.set_prefetch(tag, 1))
                await asyncio.wait_for(gate.holding.wait(), WAIT_S)
                # The new consumer takes at most 1; the old one, not yet cancelled, the rest.
                publisher = await self.other_connection(broker)
                sent = bodies("in-the-swap", 4)
                for body in sent:
                    await publisher.publish(exchange, "work", body)
                await until(lambda: len(inbox.received) == len(sent), "every message delivered during the swap")
                gate.release()
                await asyncio.wait_for(lowering, WAIT_S)
                for delivery in inbox.received:
                    inbox.ack(delivery)
                assert_each_once_none_redelivered(inbox, sent)
            finally:
                gate.release()
                await gate.shut()

        self.run(scenario)

    def test_after_a_refused_publish_later_ones_go_on_a_fresh_channel_and_arrive(self, caplog):
        """A full queue (overflow reject-publish) refuses a publish with QueueFull; the next
        publish goes on a fresh channel (a refused channel can stay refused: see
        qm/broker/confirms.py), so once the queue has room, publishing just works again."""
        caplog.set_level(logging.INFO, logger="qm.broker.rabbitmq")

        async def scenario(broker: Broker) -> None:
            exchange, queue = unique("direct"), unique("capped")
            await broker.declare_exchange(exchange, "direct")
            await broker.declare_queue(queue, {"x-max-length": 1, "x-overflow": "reject-publish"})
            await broker.bind_queue(queue, exchange, "work")
            await broker.publish(exchange, "work", b"fits")
            for _ in range(2):
                with pytest.raises(QueueFull, match="basic.nack"):
                    await broker.publish(exchange, "work", b"refused")
            renewed = [r for r in caplog.records if "publishing on a fresh channel" in r.getMessage()]
            assert len(renewed) == 1  # once per refused channel, not once per refusal
            inbox = Inbox(broker, auto_ack=True)
            await broker.consume(queue, inbox, prefetch=1)
            assert (await inbox.next()).body == b"fits"
            await broker.publish(exchange, "work", b"after")
            assert (await inbox.next()).body == b"after"

        self.run(scenario)


async def consume_when_free(broker: Broker, queue: str, inbox: Inbox) -> str:
    """Consume `queue` exclusively as soon as RabbitMQ has let the previous holder go
    (it learns of a cut connection a moment after the client does); bounded."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return await broker.consume(queue, inbox, prefetch=10, exclusive=True)
        except ConsumerRefused:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Gate:
    """A TCP forwarder to RabbitMQ, run on the test's loop: `shut()` cuts every connection
    through it and refuses new ones (a network outage), `open()` lets them in again on the
    same port, so a client's reconnects find RabbitMQ again. `hold_at(method)` stops what
    the client sends at its next frame carrying that AMQP method, until `release()`: the
    broker has not read it yet, while what the broker sends still comes through."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self._upstream_port = upstream_port
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._hold_method: tuple[int, int] | None = None
        self.holding = asyncio.Event()
        self._released = asyncio.Event()

    def hold_at(self, class_id: int, method_id: int) -> None:
        self._hold_method = (class_id, method_id)
        self.holding.clear()
        self._released.clear()

    def release(self) -> None:
        self._hold_method = None
        self._released.set()

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def shut(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer, _MethodFrames()), self._pump(up_reader, writer))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frames: _MethodFrames | None = None
    ) -> None:
        """Copy one direction until it ends; then end the other side too. With `frames`
        (the client's direction), stop before a frame `hold_at` names until `release()`."""
        try:
            while data := await reader.read(65536):
                if frames is not None:
                    at = frames.feed(data, self._hold_method)
                    if at is not None:
                        writer.write(data[:at])
                        self.holding.set()
                        await self._released.wait()
                        data = data[at:]
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


class _MethodFrames:
    """Follows the AMQP 0-9-1 frames a client sends (after its 8-byte protocol header) to
    find where a frame carrying a given method starts."""

    def __init__(self) -> None:
        self._skip = 8  # bytes until the next frame starts
        self._start = bytearray()  # a frame's first bytes, maybe split across reads

    def feed(self, data: bytes, method: tuple[int, int] | None) -> int | None:
        """Where to hold `data` so that the broker does not get the first frame carrying
        `method` whole: its offset, or 0 if it began in an earlier read."""
        found, at = None, 0
        while at < len(data):
            if self._skip:
                step = min(self._skip, len(data) - at)
                self._skip, at = self._skip - step, at + step
                continue
            # 7 header bytes (type, channel, size), then a method frame's class and method ids
            want = 11 if len(self._start) >= 7 and self._start[0] == 1 else 7
            take = min(want - len(self._start), len(data) - at)
            self._start += data[at : at + take]
            at += take
            if len(self._start) < want or (want == 7 and self._start[0] == 1):
                continue
            kind, _channel, size = struct.unpack_from(">BHI", self._start)
            begins = at - len(self._start)
            if found is None and kind == 1 and struct.unpack_from(">HH", self._start, 7) == method:
                found = max(begins, 0)  # begun in an earlier read: the broker cannot act on part of it
            self._skip = 7 + size + 1 - len(self._start)  # the rest of the payload, the end octet
            self._start = bytearray()
        return found


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), RESTART_SCENARIO_TIMEOUT_S))


async def _declare_work_queue(broker: Broker) -> tuple[str, str]:
    exchange, queue = unique("direct"), unique("queue")
    await broker.declare_exchange(exchange, "direct")
    await broker.declare_queue(queue)
    await broker.bind_queue(queue, exchange, "work")
    return exchange, queue


@pytest.mark.rabbitmq
class TestRabbitMQRestarts:
    """What only a real node shows: durability and reconnects across restarts."""

    def test_graceful_restart_keeps_messages_and_consumer(self, own_rabbitmq):
        node = own_rabbitmq

        async def scenario() -> None:
            broker = RabbitMQBroker(node.url, reconnect_max_delay_s=1.0)
            try:
                await broker.connect()
                assert broker.connected
                exchange, queue = await _declare_work_queue(broker)
                sent = bodies("durable", 50)
                restarted = False
                held: list[Delivery] = []
                holding = asyncio.Event()
                after: dict[bytes, Delivery] = {}
                all_back = asyncio.Event()

                def on_delivery(delivery: Delivery) -> None:
                    if not restarted:  # keep these unacked across the restart
                        held.append(delivery)
                        if len(held) == 10:
                            holding.set()
                        return
                    broker.ack(delivery)
                    after[delivery.body] = delivery
                    if set(after) >= set(sent):
                        all_back.set()

                await broker.consume(queue, on_delivery, prefetch=10)
                await asyncio.gather(*(broker.publish(exchange, "work", body) for body in sent))
                await asyncio.wait_for(holding.wait(), WAIT_S)

                await asyncio.to_thread(node.stop)
                restarted = True
                with pytest.raises(BrokerUnavailable):
                    await asyncio.wait_for(broker.publish(exchange, "work", b"outage"), WAIT_S)
                assert not broker.connected

                await asyncio.to_thread(node.start)
                assert await broker.wait_connected(60)
                await asyncio.wait_for(all_back.wait(), 30)
                assert set(after) == set(sent)
            finally:
                await broker.close()

        _run(scenario)

    def test_confirmed_messages_survive_sigkill(self, own_rabbitmq):
        node = own_rabbitmq

        async def scenario() -> None:
            broker = RabbitMQBroker(node.url, reconnect_max_delay_s=1.0)
            try:
                await broker.connect()
                assert broker.connected
                exchange, queue = await _declare_work_queue(broker)
                confirmed = bodies("before-kill", 50)
                await asyncio.gather(*(broker.publish(exchange, "work", body) for body in confirmed))

                # More publishes in flight while the node dies: each either returned
                # (then it must survive) or raised BrokerUnavailable.
                racing = bodies("racing", 200)
                tasks = [asyncio.ensure_future(broker.publish(exchange, "work", body)) for body in racing]
                await asyncio.to_thread(node.kill)
                results = await asyncio.wait_for(
                    asyncio.gather(*tasks, return_exceptions=True), WAIT_S)
                for result in results:
                    assert result is None or isinstance(result, BrokerUnavailable), result
                confirmed += [body for body, result in zip(racing, results, strict=True) if result is None]

                await asyncio.to_thread(node.start)
                assert await broker.wait_connected(60)
                received: set[bytes] = set()
                got_all = asyncio.Event()

                def on_delivery(delivery: Delivery) -> None:
                    broker.ack(delivery)
                    received.add(delivery.body)
                    if received >= set(confirmed):
                        got_all.set()

                await broker.consume(queue, on_delivery, prefetch=100)
                await asyncio.wait_for(got_all.wait(), 30)
                assert set(confirmed) <= received
                assert received <= set(confirmed) | set(racing)
            finally:
                await broker.close()

        _run(scenario)
