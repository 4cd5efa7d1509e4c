"""The broker contract shared by the RabbitMQ and in-memory implementations.

Every method is a coroutine run on the caller's asyncio loop. `publish` returns only once
the broker has taken responsibility for the message (a publisher confirm for RabbitMQ).
Consumers get `Delivery` objects through a plain callback and settle them with `ack` or
`nack`; settling a delivery from a channel that has since been lost is a no-op, because
the broker has already requeued it.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from typing import Any, Callable

from qm.errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: Exchange kinds understood by `declare_exchange`.
EXCHANGE_KINDS = ("direct", "fanout")


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer; settle it exactly once."""

    body: bytes
    headers: dict[str, Any]
    redelivered: bool
    delivery_tag: int
    consumer_tag: str
    channel_generation: int


DeliveryCallback = Callable[[Delivery], None]


class Broker(abc.ABC):
    """Durable, confirmed messaging as QueueMaster needs it."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Start connecting; returns once connected (raises BrokerUnavailable on failure)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close; unacked deliveries return to their queues."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether publishes can currently succeed."""

    @abc.abstractmethod
    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        """Wait until connected (after a reconnect); False on timeout."""

    def unavailable(self) -> BrokerUnavailable:
        """The error to raise while disconnected; implementations name their address."""
        return BrokerUnavailable("the message broker is unreachable; check that it is running")

    @abc.abstractmethod
    async def declare_exchange(self, name: str, kind: str) -> None:
        """Declare a durable exchange (idempotent; replayed after reconnects)."""

    @abc.abstractmethod
    async def declare_queue(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        """Declare a durable queue (idempotent; replayed after reconnects)."""

    @abc.abstractmethod
    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        """Route messages from exchange to queue (replayed after reconnects)."""

    @abc.abstractmethod
    async def queue_size(self, queue: str) -> int | None:
        """Messages ready in a queue (unacked ones not counted); None if there is no such queue."""

    @abc.abstractmethod
    async def delete_queue(self, queue: str, if_empty: bool = False) -> None:
        """Delete a queue and what it holds (no-op if absent); it is no longer re-declared.
        With `if_empty`, a queue holding messages is kept and BrokerRefused raised."""

    @abc.abstractmethod
    async def delete_exchange(self, exchange: str) -> None:
        """Delete an exchange (no-op if absent); it is no longer re-declared."""

    @abc.abstractmethod
    async def publish(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        """Publish a persistent message; return once the broker confirmed it.

        Raises BrokerUnavailable when disconnected, or when the broker refuses the message.
        Many publishes may be in flight at once (pipelined confirms).
        """

    @abc.abstractmethod
    async def consume(
        self,
        queue: str,
        on_delivery: DeliveryCallback,
        prefetch: int,
        arguments: dict[str, Any] | None = None,
        exclusive: bool = False,
    ) -> str:
        """Start a consumer with at most `prefetch` unacked deliveries; return its tag.

        The consumer is re-established after reconnects. On a stream queue
        (x-queue-type stream), `arguments` {"x-stream-offset": "first"} makes every consumer
        read every message from the start, each on its own; acks only grant more credit.

        `exclusive=True` makes it the queue's only consumer, from any connection: it is
        refused with `qm.errors.ConsumerRefused` while the queue has another active consumer,
        and while it is active every other consumer of the queue is refused the same way.
        It holds until cancelled or until its connection ends (then also across
        `set_prefetch`). After a reconnect it is re-established exclusively; a refusal then
        (someone else took the queue meanwhile) is logged as an error and retried with the
        reconnect, never given up silently.
        """

    @abc.abstractmethod
    async def set_prefetch(self, consumer_tag: str, prefetch: int) -> None:
        """Change a running consumer's prefetch; outstanding deliveries stay valid."""

    @abc.abstractmethod
    async def cancel(self, consumer_tag: str) -> None:
        """Stop new deliveries to a consumer; its unacked deliveries may still be settled."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery, through: bool = False) -> None:
        """The delivery is done with; the broker forgets it. With `through`, also every
        earlier delivery of the same consumer still unacked (one frame for a batch)."""

    @abc.abstractmethod
    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        """Return the delivery to its queue (requeue) or drop it."""

    @abc.abstractmethod
    def settleable(self, delivery: Delivery) -> bool:
        """Whether an ack or nack of the delivery still reaches the broker: False once its
        channel is gone (the broker requeued the delivery itself, marked redelivered)."""

    @property
    def node_count(self) -> int:
        """How many broker nodes this client may connect to. With one, what a lost channel
        held comes back to its queue with that node; with several, a quorum queue may keep
        it with a consumer of a node that went away until that node returns."""
        return 1


#: Longest wait for the broker to come back before trying a publish again.
REPUBLISH_WAIT_S = 5.0
#: First pause after the broker refused (nacked) a publish while connected; doubles up to
#: REPUBLISH_WAIT_S. A quorum queue nacks while it has no leader (a node of the cluster went
#: away): trying again at once would only spin.
REFUSED_BACKOFF_S = 0.1
#: How long refusals (basic.nack: a full queue, a quorum queue without a leader) are tried
#: again before the refusal is raised: far beyond a leader election, yet bounded.
MAX_REFUSED_S = 120.0


async def publish_until_confirmed(
    broker: Broker, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any], what: str
) -> None:
    """Publish until the broker confirms, waiting out disconnections (for messages that are
    a task's value or its only copy). `what` names the message in the warning. Refusals
    while connected are tried again with a growing pause for MAX_REFUSED_S, then raised:
    a refusal that lasts is not waited out for ever."""
    refused_backoff_s = REFUSED_BACKOFF_S
    refused_for_s = 0.0
    while True:
        try:
            await broker.publish(exchange, routing_key, body, headers)
            return
        except BrokerUnavailable as exc:
            log.warning("%s: cannot publish to %s yet (%s); retrying", what, exchange or "(default)", exc)
            if broker.connected:  # refused, not disconnected
                if refused_for_s >= MAX_REFUSED_S:
                    raise
                await asyncio.sleep(refused_backoff_s)
                refused_for_s += refused_backoff_s
                refused_backoff_s = min(refused_backoff_s * 2, REPUBLISH_WAIT_S)
            else:
                await broker.wait_connected(REPUBLISH_WAIT_S)
