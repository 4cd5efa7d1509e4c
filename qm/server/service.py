"""Server logic, free of gRPC: validate → record → publish (confirmed) → answer;
events from the server's own durable queue → store → stream followers.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from qm import limits as task_limits
from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import TaskNotFound, ValidationError
from qm.messages import TaskEvent, TaskMessage
from qm.registry import Registry
from qm.server.hub import Hub
from qm.server.store import Store, TaskRecord
from qm.states import TaskState

log = logging.getLogger(__name__)

#: Logical queue names: what RabbitMQ accepts in a queue name, kept short and plain.
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
#: Unacked events the server's events consumer may hold (applied in batches).
EVENTS_PREFETCH = 1000


class TaskService:
    """What SubmitTask, GetTaskStatus and StreamTaskResults do."""

    def __init__(self, registry: Registry, store: Store, broker: Broker, *,
                 max_payload_bytes: int, queue_type: str = "classic", default_timeout_s: float = 600.0,
                 default_memory_limit_mb: int = 0, consumer_timeout_s: float = 1800.0) -> None:
        self.registry = registry
        self.store = store
        self.broker = broker
        self.hub = Hub()
        self.max_payload_bytes = max_payload_bytes
        self.queue_type = queue_type
        self.default_timeout_s = default_timeout_s
        self.default_memory_limit_mb = default_memory_limit_mb
        self.consumer_timeout_s = consumer_timeout_s
        self._declared_queues: set[str] = set()
        self._events: asyncio.Queue[Delivery] = asyncio.Queue()
        self._applier: asyncio.Task | None = None

    # -- submit / status -------------------------------------------------------------

    def validate(self, task_type: str, payload: bytes, queue: str) -> None:
        """Raise ValidationError naming the field unless the submission is acceptable."""
        if not task_type:
            raise ValidationError("type", "missing; name a task type (see the installed plugins)")
        declared = self.registry.get(task_type)
        if not QUEUE_NAME_RE.match(queue):
            raise ValidationError("queue", f"{queue!r} is not a valid queue name "
                                           "(1-100 of letters, digits, _ . -)")
        if len(payload) > self.max_payload_bytes:
            raise ValidationError("payload", f"{len(payload)} bytes exceeds the limit of "
                                             f"{self.max_payload_bytes} bytes (server.max_payload_bytes)")
        declared.check_payload(payload)

    async def submit(self, task_type: str, payload: bytes, queue: str = "", *, timeout_s: float = 0.0,
                     memory_limit_mb: int = 0) -> TaskRecord:
        """Accept a task: it is durable in RabbitMQ when this returns."""
        queue = queue or topology.DEFAULT_QUEUE
        self.validate(task_type, payload, queue)
        limits = task_limits.resolve(
            self.registry.get(task_type), timeout_s, memory_limit_mb, default_timeout_s=self.default_timeout_s,
            default_memory_limit_mb=self.default_memory_limit_mb, consumer_timeout_s=self.consumer_timeout_s)
        if not self.broker.connected:
            raise self.broker.unavailable()
        await self._ensure_queue(queue)
        now = time.time()
        record = TaskRecord(str(uuid.uuid4()), task_type, queue, self.registry.get(task_type).codec,
                            TaskState.QUEUED, 0, None, "", "", now, None, None, now,
                            limits.timeout_s, limits.memory_limit_mb)
        message = TaskMessage(record.task_id, task_type, payload, queue, 1, now,
                              limits.timeout_s, limits.memory_limit_mb)
        self.store.insert(record)
        try:
            await self.broker.publish(topology.TASKS_EXCHANGE, queue, message.encode(), message.headers())
        except BaseException:
            self.store.delete(record.task_id)  # never a stored half-task
            raise
        return record

    async def _ensure_queue(self, queue: str) -> None:
        if queue not in self._declared_queues:
            await topology.declare_work_queue(self.broker, queue, self.queue_type)
            self._declared_queues.add(queue)

    def status(self, task_id: str) -> TaskRecord:
        record = self.store.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    # -- events ----------------------------------------------------------------------

    async def start_events(self, server_id: str) -> None:
        """Consume this replica's durable events queue into the store."""
        name = await topology.declare_events_queue(self.broker, server_id, self.queue_type)
        self._applier = asyncio.create_task(self._apply_events(), name="events-applier")
        await self.broker.consume(name, self._events.put_nowait, EVENTS_PREFETCH)

    async def stop_events(self) -> None:
        if self._applier is not None:
            self._applier.cancel()
            await asyncio.gather(self._applier, return_exceptions=True)

    async def _apply_events(self) -> None:
        while True:
            batch = [await self._events.get()]
            while not self._events.empty():
                batch.append(self._events.get_nowait())
            self._apply_batch(batch)

    def _apply_batch(self, deliveries: list[Delivery]) -> None:
        """Apply, commit, then ack: an event is never acked before it is stored."""
        events = []
        for delivery in deliveries:
            try:
                events.append(TaskEvent.decode(delivery.body))
            except ValueError as exc:
                log.error("dropping an undecodable event (headers %s): %s", delivery.headers, exc)
        codecs = {name: declared.codec for name, declared in self.registry.types.items()}
        for record in self.store.apply(events, codecs):
            self.hub.publish(record)
        for delivery in deliveries:
            self.broker.ack(delivery)
