"""RabbitMQ names and declarations shared by qm-server and qm-worker (idempotent)."""

from __future__ import annotations

import logging
import re

from qm import priority as priorities
from qm.broker.base import Broker
from qm.errors import BrokerRefused, ConfigError

log = logging.getLogger(__name__)

#: Direct exchange routing tasks to work queues by logical queue name.
TASKS_EXCHANGE = "qm.tasks"
#: Fanout exchange carrying every task state change to each server's events queue.
EVENTS_EXCHANGE = "qm.events"
#: Fanout exchange for tasks that failed for good; each server keeps its own queue on it.
DEAD_EXCHANGE = "qm.dead"
#: RabbitMQ's own delivery limit, as a multiple of the start limit (broker.delivery_limit).
DELIVERY_BACKSTOP_FACTOR = 4
#: Fanout exchange carrying cancels into the cancel stream.
CONTROL_EXCHANGE = "qm.control"
#: RabbitMQ stream of cancelled task ids, read by every worker from its start.
CANCEL_STREAM = "qm.cancels"
#: How long cancels are kept in the stream (RabbitMQ duration syntax).
CANCEL_STREAM_MAX_AGE = "7D"
#: Consumer argument: read a stream from its first message.
FROM_STREAM_START = {"x-stream-offset": "first"}
#: Fanout exchange of worker heartbeats; each server keeps a short-lived queue on it.
HEARTBEATS_EXCHANGE = "qm.heartbeats"
#: A heartbeat older than this is useless: it expires in the queue.
HEARTBEAT_TTL_MS = 30_000
#: A server's heartbeat queue is deleted this long after the server is gone.
HEARTBEAT_QUEUE_EXPIRES_MS = 600_000
#: Logical queue used when a submission names none.
DEFAULT_QUEUE = "default"
#: Quorum-queue arguments that make RabbitMQ dead-letter at least once: a message leaves
#: the source queue only when the target queue confirmed it (RabbitMQ >= 3.10; at-least-once
#: requires the reject-publish overflow, else RabbitMQ falls back to at-most-once).
AT_LEAST_ONCE_DEAD_LETTERING = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


#: Logical queue names: what RabbitMQ accepts in a queue name, kept short and plain.
QUEUE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
#: Endings a logical queue name may not have: they name the priority bands of another
#: queue ("jobs.p7" would be the high band of "jobs").
_BAND_SUFFIX_RE = re.compile(r"\.p[0-9]$")
#: Suffix of the work queues of multi-CPU tasks (`qm.tasks.<queue>.cpus<N>`); a logical
#: queue name may not end in it, so no two queues' work queues share a name.
CPUS_SUFFIX_RE = re.compile(r".*\.cpus[0-9]+")


def queue_name_problem(queue: str) -> str | None:
    """Why `queue` cannot be a logical queue name (the one rule for servers and workers), or None."""
    if not QUEUE_NAME_RE.fullmatch(queue):
        return f"{queue!r} is not a valid queue name (1-100 of letters, digits, _ . -)"
    if _BAND_SUFFIX_RE.search(queue):
        return f"{queue!r} ends like a priority band's work queue (.p<digit>); choose another name"
    if CPUS_SUFFIX_RE.fullmatch(queue):
        return f"{queue!r} ends in .cpus<N>, which names the work queues of multi-CPU tasks; choose another name"
    return None


def routing_key(queue: str, *, priority: int = priorities.DEFAULT_PRIORITY, cpus: int = 1) -> str:
    """Routing key on qm.tasks (and through the delay tiers, which keep it) of a task of
    `queue`, `priority` and `cpus`: its work queue is bound with it. cpus <= 1: the queue
    name plus the band of `priority` (qm/priority.py: "" for the default band, else
    `.p<N>`); cpus > 1: `<queue>.cpus<N>`, the work queue of tasks of that size, consumed
    only by workers they fit. Multi-CPU queues carry no priority bands: priority applies
    among cpus=1 tasks (a multi-CPU task keeps its priority on record)."""
    if cpus > 1:
        return f"{queue}.cpus{cpus}"
    return f"{queue}{priorities.suffix(priority)}"


def work_queue_name(queue: str, *, priority: int = priorities.DEFAULT_PRIORITY, cpus: int = 1) -> str:
    """The durable AMQP queue behind a logical queue name, for tasks of `priority` and
    `cpus` (`routing_key`: the default band and cpus=1 keep the plain name)."""
    return f"qm.tasks.{routing_key(queue, priority=priority, cpus=cpus)}"


def events_queue_name(server_id: str) -> str:
    """The durable events queue owned by one server replica."""
    return f"qm.events.{server_id}"


def delay_tier_name(tier_s: int) -> str:
    """Exchange and quorum queue of one retry delay tier."""
    return f"qm.delay.{tier_s}s"


def legacy_wait_tier_name(tier_s: int) -> str:
    """Exchange and classic queue of a delay tier as versions before 0.2 declared it
    (dead-lettered at most once: see qm/broker/migrate.py)."""
    return f"qm.wait.{tier_s}s"


def dead_queue_name(server_id: str) -> str:
    """The durable dead-letter queue owned by one server replica."""
    return f"qm.dead.{server_id}"


def work_queue_arguments(queue_type: str, delivery_limit: int, max_length: int = 0) -> dict[str, object]:
    """A task that kills whole workers is stopped by the servers counting its starts
    (broker.delivery_limit, see TaskService._watch_for_poison). Quorum queues add a
    backstop: RabbitMQ counts every return, also those of tasks that were only waiting in
    a dying worker's buffer, so its limit is set well above ours and only catches what the
    start count could not (x-delivery-limit counts redeliveries: N allows N + 1).

    `max_length` (broker.max_queue_length; 0 = none) caps the ready messages: past it
    RabbitMQ refuses a publish (basic.nack, overflow reject-publish) instead of growing
    the queue without bound, and the server answers that submit RESOURCE_EXHAUSTED."""
    arguments: dict[str, object] = {"x-queue-type": queue_type, "x-dead-letter-exchange": DEAD_EXCHANGE}
    if queue_type == "quorum":
        arguments["x-delivery-limit"] = delivery_limit * DELIVERY_BACKSTOP_FACTOR
        arguments.update(AT_LEAST_ONCE_DEAD_LETTERING)
    if max_length:
        arguments.update({"x-max-length": max_length, "x-overflow": "reject-publish"})
    return arguments


async def declare_work_queue(
    broker: Broker,
    queue: str,
    queue_type: str = "quorum",
    delivery_limit: int = 5,
    max_length: int = 0,
    *,
    priority: int = priorities.DEFAULT_PRIORITY,
    cpus: int = 1,
) -> str:
    """Declare the tasks exchange and one work queue bound to it (the band of `priority`:
    each band is a queue of its own, with the same arguments); return the AMQP name.

    RabbitMQ cannot change an existing queue's arguments (406 PRECONDITION_FAILED), so a
    work queue declared by an older version is used as it is, with a warning saying how
    to migrate: one from before the length cap (broker.max_queue_length; the cap can be
    put on it with a RabbitMQ policy instead), or a quorum queue from before 0.2 without
    at-least-once dead-lettering (its only RabbitMQ dead-lettering is the delivery-limit
    backstop, and the server's reconciler covers what that could drop). A queue of the
    other type than `broker.queue_type`, or with another cap, stops with the way out.
    `cpus` > 1: the work queue of tasks of that size, which has no bands (`routing_key`).
    """
    name = work_queue_name(queue, priority=priority, cpus=cpus)
    await broker.declare_exchange(TASKS_EXCHANGE, "direct")
    await broker.declare_exchange(DEAD_EXCHANGE, "fanout")
    arguments = work_queue_arguments(queue_type, delivery_limit, max_length)
    try:
        await broker.declare_queue(name, arguments)
    except BrokerRefused as refused:
        if refused.code != 406:
            raise
        await _declare_legacy_work_queue(broker, name, queue_type, delivery_limit, max_length)
    await broker.bind_queue(name, TASKS_EXCHANGE, routing_key(queue, priority=priority, cpus=cpus))
    return name


def _without(arguments: dict[str, object], *keys: str) -> dict[str, object]:
    return {key: value for key, value in arguments.items() if key not in keys}


#: Policy command that puts the length cap on a work queue declared before it (logged).
_CAP_POLICY = (
    "rabbitmqctl set_policy --apply-to queues qm-work-cap '^qm\\.tasks\\.' "
    '\'{{"max-length": {max_length}, "overflow": "reject-publish"}}\''
)


async def _declare_legacy_work_queue(
    broker: Broker, name: str, queue_type: str, delivery_limit: int, max_length: int
) -> None:
    """The work queue exists with other arguments than this version declares. Declared by
    an older version (no length cap; before 0.2 no at-least-once strategy either): use it
    as it is. Otherwise (another type, delivery limit or cap): stop with the way out."""
    current = work_queue_arguments(queue_type, delivery_limit, max_length)
    uncapped = work_queue_arguments(queue_type, delivery_limit)
    detail = ""
    for legacy, missing in (
        (uncapped, "the length cap (broker.max_queue_length)"),
        (_without(uncapped, *AT_LEAST_ONCE_DEAD_LETTERING), "at-least-once dead-lettering and the length cap"),
    ):
        if legacy == current:
            continue
        try:
            await broker.declare_queue(name, legacy)
        except BrokerRefused as refused:
            detail = refused.text
            continue
        policy = f"; meanwhile a policy can cap it: {_CAP_POLICY.format(max_length=max_length)}" if max_length else ""
        log.warning(
            "work queue %s was declared by an older version without %s; using it as it is. To migrate: "
            "drain it, delete it (rabbitmqctl delete_queue %s) and restart%s; see docs/architecture.md "
            "(Topology)",
            name,
            missing,
            name,
            policy,
        )
        return
    other = "classic" if queue_type == "quorum" else "quorum"
    try:  # is it simply the other type (broker.queue_type changed)?
        await broker.declare_queue(
            name, _without(work_queue_arguments(other, delivery_limit), *AT_LEAST_ONCE_DEAD_LETTERING)
        )
        what = f"is a {other} queue, but broker.queue_type is {queue_type!r}"
    except BrokerRefused:
        what = (
            f"exists with other arguments than a {queue_type!r} work queue with delivery limit "
            f"{delivery_limit} and length cap {max_length or 'none'} (broker.queue_type, "
            f"broker.delivery_limit or broker.max_queue_length changed?): {detail}"
        )
    raise ConfigError(
        "broker.queue_type",
        (
            f"the work queue {name} in RabbitMQ {what}. RabbitMQ cannot change a queue's type or arguments: "
            f"stop the workers of queue {name.removeprefix('qm.tasks.')} once it is drained, delete it "
            f"(rabbitmqctl delete_queue {name}), then start the servers and workers again"
        ),
    ) from None


async def _declare_on_fanout(broker: Broker, exchange: str, queue: str, arguments: dict[str, object]) -> str:
    """A fanout exchange and one queue bound to it (the shape of every queue but work queues)."""
    await broker.declare_exchange(exchange, "fanout")
    await broker.declare_queue(queue, arguments)
    await broker.bind_queue(queue, exchange)
    return queue


def delay_tier_arguments(tier_s: int) -> dict[str, object]:
    """A quorum queue whose messages expire after `tier_s` and are dead-lettered to
    qm.tasks at least once: an expired message stays until its work queue confirmed it,
    so a broker restart or a leader election while it expires cannot drop it."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": tier_s * 1000,
        "x-dead-letter-exchange": TASKS_EXCHANGE,
        **AT_LEAST_ONCE_DEAD_LETTERING,
    }


async def declare_delay_tier(broker: Broker, tier_s: int) -> str:
    """A delay tier: messages wait `tier_s`, then return to qm.tasks with their routing key
    (the logical queue), so one delay queue serves every work queue."""
    name = delay_tier_name(tier_s)
    await broker.declare_exchange(TASKS_EXCHANGE, "direct")
    return await _declare_on_fanout(broker, name, name, delay_tier_arguments(tier_s))


def server_queue_arguments(queue_type: str, **arguments: object) -> dict[str, object]:
    """Arguments of a server's own queue. Classic: on one node, and an exclusive consumer is
    enforced. Quorum: replicated over the cluster; RabbitMQ records but does not enforce an
    exclusive consumer on it, so the events queue gets a single active consumer instead
    (a second server under the same id waits rather than applying events alongside)."""
    return {"x-queue-type": queue_type, **arguments}


async def _declare_server_queue(broker: Broker, exchange: str, queue: str, arguments: dict[str, object]) -> str:
    """A server's own queue; one that exists as another type stops the server with the way out."""
    try:
        return await _declare_on_fanout(broker, exchange, queue, arguments)
    except BrokerRefused as refused:
        if refused.code != 406:
            raise
        raise ConfigError(
            "broker.server_queue_type",
            (
                f"the queue {queue} in RabbitMQ exists with other arguments than this server declares "
                f"({arguments}): {refused.text}. RabbitMQ cannot change a queue's type or arguments: stop this "
                f"server, let it be drained or accept losing what it holds, delete it (rabbitmqctl delete_queue "
                f"{queue}), then start the server again; or set broker.server_queue_type back"
            ),
        ) from None


async def declare_dead_queue(broker: Broker, server_id: str, queue_type: str = "classic") -> str:
    """Declare the dead-letter exchange and this replica's durable queue on it."""
    return await _declare_server_queue(
        broker, DEAD_EXCHANGE, dead_queue_name(server_id), server_queue_arguments(queue_type)
    )


async def declare_events_queue(broker: Broker, server_id: str, queue_type: str = "classic") -> str:
    """Declare the events exchange and this replica's durable queue on it."""
    single = {"x-single-active-consumer": True} if queue_type == "quorum" else {}
    return await _declare_server_queue(
        broker, EVENTS_EXCHANGE, events_queue_name(server_id), server_queue_arguments(queue_type, **single)
    )


async def declare_cancel_stream(broker: Broker) -> str:
    """The stream of cancelled task ids: every worker reads it from the start (within
    CANCEL_STREAM_MAX_AGE), so one that starts after a cancel still drops that task."""
    return await _declare_on_fanout(
        broker, CONTROL_EXCHANGE, CANCEL_STREAM, {"x-queue-type": "stream", "x-max-age": CANCEL_STREAM_MAX_AGE}
    )


async def declare_heartbeats_queue(broker: Broker, server_id: str, queue_type: str = "classic") -> str:
    """This replica's queue of worker heartbeats: old ones expire, and the queue goes
    away once its server has been gone a while (heartbeats are not worth keeping; a
    quorum one is replicated only so that it can be declared again while a node is down)."""
    arguments = server_queue_arguments(
        queue_type, **{"x-message-ttl": HEARTBEAT_TTL_MS, "x-expires": HEARTBEAT_QUEUE_EXPIRES_MS}
    )
    return await _declare_server_queue(broker, HEARTBEATS_EXCHANGE, f"qm.heartbeats.{server_id}", arguments)
