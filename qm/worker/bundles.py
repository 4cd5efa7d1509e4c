"""Bundles on the worker: a work-queue message holding several tasks (messages.TaskBundle).

    bundle message (one delivery tag) ──open──► Member 1..N, each handled like a message of
                                                its own (run, outcome event, settle)
    every member settled ──► the message is acked (batched like any other: acks.py)
    redelivered bundle ──split──► each task published as a message of its own, marked
                                  Header.SUSPECT; the bundle acked once all are confirmed

RabbitMQ settles whole messages, so a member cannot be acked or returned alone:
- a member that goes back unstarted (prefetch drop, drain, held too long) is published as
  a copy of its own and then counts as settled (Supervisor._republish), as a single
  message does; one whose run was cut short goes back the same way, marked a suspect;
- if such a copy is refused, the member stays owed: once the others are settled the whole
  message goes back to the queue, comes back redelivered and is split (its settled tasks
  may then run again: at-least-once, as after any lost ack);
- an undecodable member is dropped with an error, as RabbitMQ's dead-lettering of an
  undecodable message ends (the servers drop those).

A redelivered bundle may hold the task that took its last worker down. Run as a bundle,
its tasks would share one delivery count, and a poison task would take the good ones to
the dead letters with it. Split, each task is a suspect of its own: it runs alone with its
start confirmed first (qm/worker/isolation.py), and a quorum queue counts its redeliveries
on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Callable, Coroutine

from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import BrokerUnavailable
from qm.messages import TaskMessage, decode_bundle, decode_tasks
from qm.protocol import Header
from qm.worker.acks import AckBatcher

log = logging.getLogger(__name__)


class Bundle:
    """One bundle message while its members are being handled."""

    def __init__(self, delivery: Delivery, count: int) -> None:
        self.delivery = delivery
        self.owed = set(range(count))  # members not settled yet, by index
        self.returning = False  # a member could not go back alone: the whole message goes back


@dataclasses.dataclass(frozen=True, eq=False)
class Member(Delivery):
    """One task of a bundle, handled as a delivery of its own. `message` is its decoded
    task (None if it does not decode); its headers are the ones a single message of it has."""

    bundle: Bundle | None = None
    index: int = 0
    message: TaskMessage | None = None


def is_suspect(delivery: Delivery) -> bool:
    """Whether its last run may have killed a worker: redelivered by RabbitMQ, or
    published again marked so (a member of a redelivered bundle, or one cut short)."""
    return delivery.redelivered or Header.SUSPECT in delivery.headers


class BundleAcks(AckBatcher):
    """AckBatcher that also settles bundle members: the message once all are settled."""

    def __init__(self, broker: Broker, spawn: Callable[[Coroutine], object]) -> None:
        super().__init__(broker)
        self._spawn = spawn  # runs a coroutine in the background (the split's publishes)
        self.split_count = 0  # redelivered bundles split (for tests and logs)

    def open(self, delivery: Delivery) -> list[Member]:
        """The members of a bundle delivery (already tracked) to handle; none if it is
        redelivered (split instead) or undecodable (rejected: dead-lettered)."""
        try:
            bodies = decode_bundle(delivery.body)
        except ValueError as exc:
            log.error("rejecting an undecodable bundle (headers %s): %s", delivery.headers, exc)
            super().nack(delivery, requeue=False)
            return []
        if delivery.redelivered:
            self._spawn(self._split(delivery, bodies))
            return []
        bundle = Bundle(delivery, len(bodies))
        members = []
        for index, body in enumerate(bodies):
            try:
                message: TaskMessage | None = TaskMessage.decode(body)
            except ValueError:
                message = None  # rejected when handled, with the reason
            members.append(
                Member(
                    body,
                    message.headers() if message is not None else {},
                    False,
                    delivery.delivery_tag,
                    delivery.consumer_tag,
                    delivery.channel_generation,
                    bundle,
                    index,
                    message,
                )
            )
        return members

    def done(self, delivery: Delivery) -> None:
        if isinstance(delivery, Member):
            self._settle_member(delivery)
        else:
            super().done(delivery)

    def nack(self, delivery: Delivery, requeue: bool) -> None:
        """A member cannot be returned alone: with `requeue`, the whole message goes back
        once the others are settled; without, the member is dropped (logged by the caller)."""
        if not isinstance(delivery, Member):
            super().nack(delivery, requeue)
            return
        if requeue and delivery.bundle is not None and not delivery.bundle.returning:
            delivery.bundle.returning = True
            log.warning(
                "task %s of a bundle could not go back alone: the whole bundle goes back once its "
                "other tasks are settled (they may run again)",
                delivery.headers.get(Header.TASK_ID),
            )
        self._settle_member(delivery)

    def _settle_member(self, member: Member) -> None:
        bundle = member.bundle
        if bundle is None or member.index not in bundle.owed:
            return  # settled already
        bundle.owed.discard(member.index)
        if bundle.owed:
            return
        if bundle.returning:
            super().nack(bundle.delivery, requeue=True)
        else:
            super().done(bundle.delivery)

    async def _split(self, delivery: Delivery, bodies: list[bytes]) -> None:
        """Publish each task of a redelivered bundle as a suspect message of its own, then
        ack the bundle. If a publish fails, the bundle goes back (and is split again)."""
        tasks, errors = decode_tasks(bodies)
        for exc in errors:
            log.error("dropping an undecodable task of a redelivered bundle: %s", exc)
        publishes = [
            self.broker.publish(
                topology.TASKS_EXCHANGE, message.routing_key, body, {**message.headers(), Header.SUSPECT: 1}
            )
            for body, message in tasks
        ]
        results = await asyncio.gather(*publishes, return_exceptions=True)
        failed = [result for result in results if isinstance(result, BaseException)]
        for result in failed:
            if not isinstance(result, BrokerUnavailable):
                log.error("splitting a redelivered bundle failed", exc_info=result)
        if failed:
            log.warning(
                "a redelivered bundle of %d tasks could not be split (%d publishes failed): it goes back "
                "to its queue (the tasks published already may run twice)",
                len(bodies),
                len(failed),
            )
            super().nack(delivery, requeue=True)
            return
        self.split_count += 1
        log.info("split a redelivered bundle into %d suspect tasks (each runs alone)", len(publishes))
        super().done(delivery)
