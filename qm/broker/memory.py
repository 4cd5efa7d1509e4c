"""In-memory broker for unit tests: same contract as RabbitMQ, one process, no network.

Semantics mirrored from RabbitMQ: direct and fanout routing, per-consumer prefetch,
round-robin between consumers, requeue at the head with `redelivered` set, unacked
deliveries returned when the broker closes (as on a lost connection): later acks of them
are ignored. Stream queues give every consumer every message from the start. An exclusive
consumer is refused while its queue has another active consumer and refuses all others.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from typing import Any

from qm.broker.base import EXCHANGE_KINDS, Broker, Delivery, DeliveryCallback
from qm.errors import BrokerRefused, BrokerUnavailable, ConsumerRefused


@dataclasses.dataclass
class _Message:
    body: bytes
    headers: dict[str, Any]
    redelivered: bool = False


@dataclasses.dataclass
class _Consumer:
    tag: str
    queue: str
    callback: DeliveryCallback
    prefetch: int
    unacked: dict[int, _Message] = dataclasses.field(default_factory=dict)
    active: bool = True
    exclusive: bool = False


class MemoryBroker(Broker):
    """A broker living in this process; deliveries are scheduled on the running loop."""

    def __init__(self) -> None:
        self._exchanges: dict[str, str] = {}
        self._bindings: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
        self._queues: dict[str, collections.deque[_Message]] = {}
        self._queue_arguments: dict[str, dict[str, Any]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._streams: dict[str, list[_Message]] = {}  # stream queue → every message, kept
        self._tags = itertools.count(1)
        self._generation = 0
        self._connected = asyncio.Event()

    async def connect(self) -> None:
        self._generation += 1
        self._connected.set()

    async def close(self) -> None:
        self._drop_connection()

    def _drop_connection(self) -> None:
        self._connected.clear()
        for consumer in self._consumers.values():
            self._requeue_all(consumer)
        self._consumers.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _check_connected(self) -> None:
        if not self.connected:
            raise BrokerUnavailable("in-memory broker is not connected")

    async def declare_exchange(self, name: str, kind: str) -> None:
        self._check_connected()
        if kind not in EXCHANGE_KINDS:
            raise ValueError(f"exchange kind must be one of {EXCHANGE_KINDS}, got {kind!r}")
        if self._exchanges.setdefault(name, kind) != kind:
            raise BrokerUnavailable(f"exchange {name!r} exists with kind {self._exchanges[name]!r}")

    async def declare_queue(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        self._check_connected()
        arguments = dict(arguments or {})
        existing = self._queue_arguments.setdefault(name, arguments)
        for key in sorted(set(existing) | set(arguments)):
            if existing.get(key) != arguments.get(key):  # as RabbitMQ: no silent change of a queue
                raise BrokerRefused(
                    406,
                    f"PRECONDITION_FAILED - inequivalent arg '{key}' for queue '{name}': "
                    f"received {arguments.get(key)!r} but current is {existing.get(key)!r}",
                )
        self._queues.setdefault(name, collections.deque())
        if (arguments or {}).get("x-queue-type") == "stream":
            self._streams.setdefault(name, [])

    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self._check_connected()
        self._bindings[exchange].add((queue, routing_key))

    async def queue_size(self, queue: str) -> int | None:
        self._check_connected()
        return len(self._queues[queue]) if queue in self._queues else None

    async def delete_queue(self, queue: str, if_empty: bool = False) -> None:
        self._check_connected()
        if if_empty and self._queues.get(queue):
            raise BrokerRefused(406, f"PRECONDITION_FAILED - queue '{queue}' is not empty")
        self._queues.pop(queue, None)
        self._streams.pop(queue, None)
        self._queue_arguments.pop(queue, None)
        for bindings in self._bindings.values():
            bindings -= {binding for binding in bindings if binding[0] == queue}
        for tag in [tag for tag, consumer in self._consumers.items() if consumer.queue == queue]:
            del self._consumers[tag]  # as RabbitMQ: a deleted queue's consumers are cancelled

    async def delete_exchange(self, exchange: str) -> None:
        self._check_connected()
        self._exchanges.pop(exchange, None)
        self._bindings.pop(exchange, None)

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        self._check_connected()
        if exchange not in self._exchanges:
            raise BrokerUnavailable(f"no exchange {exchange!r}")
        fanout = self._exchanges[exchange] == "fanout"
        # One copy per queue, however many of its bindings match (as RabbitMQ does).
        targets = {queue for queue, key in self._bindings[exchange] if fanout or key == routing_key}
        for queue in sorted(targets):
            message = _Message(bytes(body), dict(headers or {}))
            if queue in self._streams:
                self._streams[queue].append(message)
                for consumer in [c for c in self._consumers.values() if c.queue == queue and c.active]:
                    asyncio.get_running_loop().call_soon(self._deliver, consumer, message)  # after any replay
                continue
            self._queues[queue].append(message)
            self._schedule_dispatch(queue)

    async def consume(
        self,
        queue: str,
        on_delivery: DeliveryCallback,
        prefetch: int,
        arguments: dict[str, Any] | None = None,
        exclusive: bool = False,
    ) -> str:
        self._check_connected()
        if queue not in self._queues:
            raise BrokerUnavailable(f"no queue {queue!r}")
        others = [c for c in self._consumers.values() if c.queue == queue and c.active]
        if any(c.exclusive for c in others):
            raise ConsumerRefused(queue, "it has an exclusive consumer")
        if exclusive and others:
            raise ConsumerRefused(queue, "an exclusive consumer was asked for, but it has consumers")
        tag = f"memory-consumer-{next(self._tags)}"
        consumer = self._consumers[tag] = _Consumer(tag, queue, on_delivery, prefetch, exclusive=exclusive)
        if queue in self._streams:  # every stream consumer reads everything (no prefetch model)
            for message in list(self._streams[queue]):
                asyncio.get_running_loop().call_soon(self._deliver, consumer, message)
            return tag
        self._schedule_dispatch(queue)
        return tag

    async def set_prefetch(self, consumer_tag: str, prefetch: int) -> None:
        consumer = self._consumers.get(consumer_tag)
        if consumer:
            consumer.prefetch = prefetch
            self._schedule_dispatch(consumer.queue)

    async def cancel(self, consumer_tag: str) -> None:
        consumer = self._consumers.get(consumer_tag)
        if consumer:
            consumer.active = False

    def ack(self, delivery: Delivery, through: bool = False) -> None:
        consumer = self._settle_target(delivery)
        if consumer is None:
            return
        tags = [tag for tag in consumer.unacked if tag <= delivery.delivery_tag] if through else [delivery.delivery_tag]
        if [consumer.unacked.pop(tag, None) for tag in tags] != [None] * len(tags):
            self._schedule_dispatch(consumer.queue)

    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        consumer = self._settle_target(delivery)
        if consumer is None:
            return
        message = consumer.unacked.pop(delivery.delivery_tag, None)
        if message is not None:
            if requeue:
                message.redelivered = True
                self._queues[consumer.queue].appendleft(message)
            self._schedule_dispatch(consumer.queue)

    def settleable(self, delivery: Delivery) -> bool:
        return self._settle_target(delivery) is not None  # none once the connection dropped

    def queue_depth(self, queue: str) -> int:
        """Messages ready in a queue (not counting unacked ones)."""
        return len(self._queues[queue])

    def _settle_target(self, delivery: Delivery) -> _Consumer | None:
        if delivery.channel_generation != self._generation:
            return None
        return self._consumers.get(delivery.consumer_tag)

    def _requeue_all(self, consumer: _Consumer) -> None:
        if consumer.queue in self._streams:
            consumer.unacked.clear()  # a stream keeps every message; nothing to return
            return
        queue = self._queues[consumer.queue]
        for tag in sorted(consumer.unacked, reverse=True):
            message = consumer.unacked.pop(tag)
            message.redelivered = True
            queue.appendleft(message)

    def _schedule_dispatch(self, queue: str) -> None:
        asyncio.get_running_loop().call_soon(self._dispatch, queue)

    def _dispatch(self, queue: str) -> None:
        ready = self._queues.get(queue)
        consumers = [c for c in self._consumers.values() if c.queue == queue and c.active]
        while ready and consumers:
            for consumer in list(consumers):
                if consumer.prefetch and len(consumer.unacked) >= consumer.prefetch:
                    consumers.remove(consumer)
                    continue
                if not ready:
                    break
                self._deliver(consumer, ready.popleft())

    def _deliver(self, consumer: _Consumer, message: _Message) -> None:
        tag = next(self._tags)
        consumer.unacked[tag] = message
        consumer.callback(
            Delivery(message.body, dict(message.headers), message.redelivered, tag, consumer.tag, self._generation)
        )
