"""RabbitMQ names and declarations shared by qm-server and qm-worker (idempotent)."""
from __future__ import annotations

from qm.broker.base import Broker

#: Direct exchange routing tasks to work queues by logical queue name.
TASKS_EXCHANGE = "qm.tasks"
#: Fanout exchange carrying every task state change to each server's events queue.
EVENTS_EXCHANGE = "qm.events"
#: Logical queue used when a submission names none.
DEFAULT_QUEUE = "default"


def work_queue_name(queue: str) -> str:
    """The durable AMQP queue behind a logical queue name."""
    return f"qm.tasks.{queue}"


def events_queue_name(server_id: str) -> str:
    """The durable events queue owned by one server replica."""
    return f"qm.events.{server_id}"


async def declare_work_queue(broker: Broker, queue: str, queue_type: str = "classic") -> str:
    """Declare the tasks exchange and one work queue bound to it; return the AMQP name."""
    name = work_queue_name(queue)
    await broker.declare_exchange(TASKS_EXCHANGE, "direct")
    await broker.declare_queue(name, {"x-queue-type": queue_type})
    await broker.bind_queue(name, TASKS_EXCHANGE, queue)
    return name


async def declare_events_queue(broker: Broker, server_id: str, queue_type: str = "classic") -> str:
    """Declare the events exchange and this replica's durable queue on it."""
    name = events_queue_name(server_id)
    await broker.declare_exchange(EVENTS_EXCHANGE, "fanout")
    await broker.declare_queue(name, {"x-queue-type": queue_type})
    await broker.bind_queue(name, EVENTS_EXCHANGE)
    return name
