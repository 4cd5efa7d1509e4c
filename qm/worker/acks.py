"""Batched acks: one basic.ack(multiple=True) frame for a run of settled deliveries.

    delivery ──track──► per channel, in delivery-tag order: [t1 done][t2 running][t3 done]...
    outcome confirmed ──done──► marked; a flush is scheduled for the end of this loop turn
    returned / rejected ──nack──► settled on its own at once, leaves the order
    flush: the longest run of done deliveries at the head ──► ack(last, through=True)
           done ones behind a still-running delivery ──► ack(each) (one frame each, as before)

An ack with `multiple` settles every delivery of its channel up to its tag, so it is sent
only through a tag whose every earlier delivery on that channel is done (its outcome
confirmed) or already nacked. Tasks finish out of order across children: a done delivery
behind a running one is acked on its own rather than held, so a long task never pins
acks (and with them the prefetch window) of the short ones after it. A delivery from a
lost channel is acked like any other: the broker drops that ack (it requeued the
delivery already).
"""

from __future__ import annotations

import asyncio
import collections

from qm.broker.base import Broker, Delivery

#: A channel: the consumer's stable tag and the generation of the connection it was on.
ChannelKey = tuple[str, int]


class AckBatcher:
    """Acks deliveries of a supervisor's consumers, coalescing in-order runs."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # channel → delivery tag → (delivery, done), in the order the channel delivered them
        self._open: dict[ChannelKey, collections.OrderedDict[int, tuple[Delivery, bool]]] = {}
        self._flush_scheduled = False
        self.frames = 0  # ack frames sent (for tests and benchmarks)

    def track(self, delivery: Delivery) -> None:
        """A new delivery: it holds back `multiple` acks of later ones until settled."""
        channel = self._open.setdefault(_channel(delivery), collections.OrderedDict())
        channel[delivery.delivery_tag] = (delivery, False)

    def done(self, delivery: Delivery) -> None:
        """Its outcome is confirmed: ack it (batched, at the end of this loop turn)."""
        channel = self._open.get(_channel(delivery))
        if channel is None or delivery.delivery_tag not in channel:
            return  # settled already
        channel[delivery.delivery_tag] = (delivery, True)
        self._schedule_flush()

    def nack(self, delivery: Delivery, requeue: bool) -> None:
        """Return (requeue) or drop the delivery now; it no longer holds back later acks."""
        channel = self._open.get(_channel(delivery))
        if channel is None or channel.pop(delivery.delivery_tag, None) is None:
            return  # settled already
        self.broker.nack(delivery, requeue=requeue)
        self._schedule_flush()

    @property
    def unsettled(self) -> int:
        return sum(len(channel) for channel in self._open.values())

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send the acks owed now: a `multiple` ack per channel for its done head, a single
        ack for each done delivery behind a running one."""
        self._flush_scheduled = False
        for key in list(self._open):
            channel = self._open[key]
            last_of_head: Delivery | None = None
            while channel:
                delivery, done = next(iter(channel.values()))
                if not done:
                    break
                channel.popitem(last=False)
                last_of_head = delivery
            if last_of_head is not None:
                self.broker.ack(last_of_head, through=True)
                self.frames += 1
            for tag in [tag for tag, (_delivery, done) in channel.items() if done]:
                delivery, _done = channel.pop(tag)
                self.broker.ack(delivery)
                self.frames += 1
            if not channel:
                del self._open[key]


def _channel(delivery: Delivery) -> ChannelKey:
    return delivery.consumer_tag, delivery.channel_generation
