"""Moves what an older version left in RabbitMQ into today's topology (server start-up).

Versions before 0.2 kept delayed retries in classic `qm.wait.<N>s` queues, which RabbitMQ
dead-letters at most once: a retry that expired while its work queue was unavailable was
dropped. Their successors are the quorum `qm.delay.<N>s` queues (at-least-once). RabbitMQ
cannot change a queue's arguments, so each legacy queue found is drained into its
successor (each message published with a confirm before it is acked: nothing is lost, a
crash in between leaves a duplicate at worst) and then deleted. A moved message waits its
tier's delay again from the move.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import BrokerRefused
from qm.messages import TaskMessage

log = logging.getLogger(__name__)

#: Unacked legacy messages in flight at once while moving them.
MOVE_PREFETCH = 100
#: Poll interval while waiting for a legacy queue to be empty.
DRAIN_POLL_S = 0.1


async def migrate_legacy_delay_tiers(broker: Broker, tiers_s: Iterable[int], timeout_s: float = 60.0) -> int:
    """Drain every legacy wait queue of `tiers_s` into its delay tier and delete it;
    return how many messages moved."""
    moved = 0
    for tier_s in tiers_s:
        legacy = topology.legacy_wait_tier_name(tier_s)
        if await broker.queue_size(legacy) is None:
            continue
        target = await topology.declare_delay_tier(broker, tier_s)
        count = await _drain_into(broker, legacy, target, timeout_s)
        moved += count
        try:
            await broker.delete_queue(legacy, if_empty=True)
            await broker.delete_exchange(legacy)
            log.warning(
                "migrated the legacy delay queue %s: %d waiting retries moved to %s; it is deleted",
                legacy,
                count,
                target,
            )
        except BrokerRefused:
            log.warning(
                "the legacy delay queue %s still receives retries (a worker older than 0.2?); %d moved "
                "to %s, the rest at the next start of a server",
                legacy,
                count,
                target,
            )
    return moved


async def _drain_into(broker: Broker, source: str, target_exchange: str, timeout_s: float) -> int:
    in_flight: set[asyncio.Task] = set()
    moved = 0

    async def move(delivery: Delivery) -> None:
        nonlocal moved
        try:
            message = TaskMessage.decode(delivery.body)
        except ValueError as exc:
            log.error("dropping an undecodable message from %s: %s", source, exc)
            broker.nack(delivery, requeue=False)
            return
        await broker.publish(target_exchange, message.routing_key, delivery.body, message.headers())
        broker.ack(delivery)
        moved += 1

    def on_delivery(delivery: Delivery) -> None:
        task = asyncio.create_task(move(delivery))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    tag = await broker.consume(source, on_delivery, MOVE_PREFETCH)
    try:
        async with asyncio.timeout(timeout_s):
            while in_flight or await broker.queue_size(source):
                await asyncio.sleep(DRAIN_POLL_S)
    except TimeoutError:
        log.warning("moving %s took over %g s; the rest is moved at the next start", source, timeout_s)
    finally:
        await broker.cancel(tag)
        if in_flight:
            await asyncio.wait(set(in_flight))
    return moved
