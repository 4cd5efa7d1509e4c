"""Server logic, free of gRPC: validate → record → publish (confirmed) → answer;
events from the server's own durable queue → store → stream followers.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid

from qm import limits as task_limits
from qm import retry
from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import BrokerUnavailable, TaskAlreadyFinished, TaskNotFound, ValidationError
from qm.messages import Heartbeat, TaskEvent, TaskMessage
from qm.metrics import ServerMetrics
from qm.registry import Registry
from qm.server import maintenance
from qm.server.hub import Hub
from qm.retry import RetryPolicy
from qm.server.store import DeadLetter, Store, TaskRecord
from qm.states import TaskState

log = logging.getLogger(__name__)

#: Logical queue names: what RabbitMQ accepts in a queue name, kept short and plain.
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
#: Unacked events the server's events consumer may hold (applied in batches).
EVENTS_PREFETCH = 1000
#: Longest idempotency key accepted.
MAX_IDEMPOTENCY_KEY_CHARS = 200
#: Dead letters listed when the request names no limit, and the most one requeue moves.
DEFAULT_DEAD_LETTER_LIMIT = 100
MAX_REQUEUE = 10_000
#: Pause between attempts to publish tasks a crash left unconfirmed, while RabbitMQ is away.
UNCONFIRMED_RETRY_S = 5.0
#: Least time between two updates of the store size gauges.
STORE_GAUGES_INTERVAL_S = 5.0
#: Longest pause between two retention sweeps.
RETENTION_SWEEP_MAX_S = 3600.0


class TaskService:
    """What the TaskQueue RPCs do: submit, status, follow, dead letters."""

    def __init__(self, registry: Registry, store: Store, broker: Broker, *,
                 max_payload_bytes: int, queue_type: str = "quorum", delivery_limit: int = 5,
                 default_timeout_s: float = 600.0, default_memory_limit_mb: int = 0,
                 consumer_timeout_s: float = 1800.0, default_retry: RetryPolicy = RetryPolicy(),
                 retention_s: float = 7 * 86400.0, metrics: ServerMetrics | None = None,
                 worker_lost_after_s: float = 30.0) -> None:
        self.registry = registry
        self._codecs = {name: declared.codec for name, declared in registry.types.items()}
        self.store = store
        self.broker = broker
        self.hub = Hub()
        self.max_payload_bytes = max_payload_bytes
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.default_timeout_s = default_timeout_s
        self.default_memory_limit_mb = default_memory_limit_mb
        self.consumer_timeout_s = consumer_timeout_s
        self.default_retry = default_retry
        self.retention_s = retention_s
        self.metrics = metrics or ServerMetrics()
        self.worker_lost_after_s = worker_lost_after_s
        self._workers: dict[str, tuple[Heartbeat, float]] = {}
        self._poison_reported: set[str] = set()
        self._declared_queues: set[str] = set()
        self._pending_keys: dict[str, asyncio.Future] = {}
        self._events: asyncio.Queue[Delivery] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

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
                     memory_limit_mb: int = 0, idempotency_key: str = "", **retry_options) -> TaskRecord:
        """Accept a task: it is durable in RabbitMQ when this returns.

        With an idempotency key already seen (within the retention), the first task is
        returned and nothing is enqueued. `retry_options` are RetryPolicy fields
        (max_retries, backoff_s, backoff_max_s, jitter, on_timeout); None = default.
        """
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise ValidationError("idempotency_key", f"longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        if idempotency_key:
            if idempotency_key in self._pending_keys:  # the same key is being submitted right now
                return await asyncio.shield(self._pending_keys[idempotency_key])
            existing = self.store.find_by_idempotency_key(idempotency_key)
            if existing is not None:
                await self._publish_unconfirmed(existing.task_id)  # durable before we say so
                self.metrics.submissions.labels(existing.type, "duplicate").inc()
                return existing
        future = asyncio.get_running_loop().create_future()
        if idempotency_key:
            self._pending_keys[idempotency_key] = future
        try:
            record = await self._accept(task_type, payload, queue or topology.DEFAULT_QUEUE, timeout_s,
                                        memory_limit_mb, idempotency_key, retry_options)
            future.set_result(record)
            self.metrics.submissions.labels(task_type, "accepted").inc()
            return record
        except BaseException as exc:
            self._count_refusal(task_type, exc)
            future.set_exception(exc)
            future.exception()  # retrieved: a lone submit has no one else waiting on it
            raise
        finally:
            self._pending_keys.pop(idempotency_key, None)

    def _count_refusal(self, task_type: str, error: BaseException) -> None:
        known_type = task_type if task_type in self.registry.types else "unknown"
        if isinstance(error, ValidationError):
            self.metrics.submissions.labels(known_type, "invalid").inc()
            self.metrics.rejects.labels(error.field).inc()
        elif isinstance(error, BrokerUnavailable):
            self.metrics.submissions.labels(known_type, "unavailable").inc()

    async def _accept(self, task_type: str, payload: bytes, queue: str, timeout_s: float, memory_limit_mb: int,
                      idempotency_key: str, retry_options: dict) -> TaskRecord:
        self.validate(task_type, payload, queue)
        declared = self.registry.get(task_type)
        limits = task_limits.resolve(
            declared, timeout_s, memory_limit_mb, default_timeout_s=self.default_timeout_s,
            default_memory_limit_mb=self.default_memory_limit_mb, consumer_timeout_s=self.consumer_timeout_s)
        policy = retry.resolve(declared, self.default_retry, **retry_options)
        if not self.broker.connected:
            raise self.broker.unavailable()
        await self._ensure_queue(queue)
        now = time.time()
        record = TaskRecord(str(uuid.uuid4()), task_type, queue, declared.codec, TaskState.QUEUED, 0, None,
                            "", "", now, None, None, now, limits.timeout_s, limits.memory_limit_mb,
                            idempotency_key, policy.max_retries)
        message = TaskMessage(record.task_id, task_type, payload, queue, 1, now, limits.timeout_s,
                              limits.memory_limit_mb, policy)
        await self._enqueue(record, message)
        return record

    async def _enqueue(self, record: TaskRecord, message: TaskMessage) -> None:
        """Store (with the message, until confirmed), publish, await the confirm; if the
        publish fails nothing stays stored. If this process dies in between, the stored
        message is published again at start-up or on the client's retry (same key)."""
        body = message.encode()
        self.store.insert_unconfirmed(record, message.queue, body)
        started = time.perf_counter()
        try:
            await self.broker.publish(topology.TASKS_EXCHANGE, message.queue, body, message.headers())
        except BaseException:
            self.store.delete(record.task_id)  # never a stored half-task
            raise
        self.store.confirm(record.task_id)
        self.metrics.confirm_seconds.observe(time.perf_counter() - started)

    async def _publish_unconfirmed(self, task_id: str | None = None) -> None:
        """Publish again what a previous run of this server stored but never saw confirmed
        (at-least-once: it may have reached RabbitMQ; a duplicate delivery is harmless)."""
        for stored_id, queue, body in self.store.unconfirmed(task_id):
            await self._ensure_queue(queue)
            message = TaskMessage.decode(body)
            await self.broker.publish(topology.TASKS_EXCHANGE, queue, body, message.headers())
            self.store.confirm(stored_id)
            log.info("task %s: published again (its first publish was never confirmed)", stored_id)

    async def _publish_unconfirmed_until_done(self) -> None:
        """At start-up: the rows left unconfirmed by the previous run (not the ones this
        run is publishing right now)."""
        left = [task_id for task_id, _queue, _body in self.store.unconfirmed()]
        while left:
            try:
                await self._publish_unconfirmed(left[0])
                left.pop(0)
            except BrokerUnavailable as exc:
                log.warning("cannot yet publish tasks left unconfirmed by a crash: %s", exc)
                await self.broker.wait_connected(UNCONFIRMED_RETRY_S)

    async def _ensure_queue(self, queue: str) -> None:
        if queue not in self._declared_queues:
            await topology.declare_work_queue(self.broker, queue, self.queue_type, self.delivery_limit)
            self._declared_queues.add(queue)

    def status(self, task_id: str) -> TaskRecord:
        record = self.store.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    async def cancel(self, task_id: str) -> TaskRecord:
        """Make a task CANCELLED: tell every worker (a queued one is dropped when it comes
        up, a running one killed), then record the final state through the events queue."""
        record = self.status(task_id)
        if record.state.terminal:
            raise TaskAlreadyFinished(task_id, record.state.name)
        if not self.broker.connected:
            raise self.broker.unavailable()
        await self._broadcast_cancel(task_id)
        event = TaskEvent(task_id, record.type, record.queue, max(record.attempts, 1), TaskState.CANCELLED,
                          error="cancelled by request")
        await self.broker.publish(topology.EVENTS_EXCHANGE, "", event.encode(), {"qm-task-id": task_id})
        self._apply([event])  # answer with the final state; the queued copy is then a duplicate
        return self.status(task_id)

    async def _broadcast_cancel(self, task_id: str) -> None:
        await self.broker.publish(topology.CONTROL_EXCHANGE, "", task_id.encode(), {"qm-command": "cancel"})

    # -- dead letters ----------------------------------------------------------------

    def dead_letters(self, limit: int) -> tuple[list[DeadLetter], int]:
        return self.store.dead_letters(limit or DEFAULT_DEAD_LETTER_LIMIT)

    async def requeue_dead_letters(self, task_ids: list[str] | None) -> dict[str, str]:
        """Run dead-lettered tasks again, each as a new task (attempt 1, same payload and
        limits); returns old id → new id. Unknown ids raise TaskNotFound."""
        dead, _total = self.store.dead_letters(MAX_REQUEUE, task_ids)
        if task_ids is not None:
            missing = set(task_ids) - {letter.task_id for letter in dead}
            if missing:
                raise TaskNotFound(sorted(missing)[0])
        if dead and not self.broker.connected:
            raise self.broker.unavailable()
        renamed: dict[str, str] = {}
        for letter in dead:
            old = TaskMessage.decode(letter.body)
            now = time.time()
            message = dataclasses.replace(old, task_id=str(uuid.uuid4()), attempt=1, enqueued_at_s=now)
            record = TaskRecord(message.task_id, old.type, old.queue, self._codec(old.type), TaskState.QUEUED, 0,
                                None, "", "", now, None, None, now, old.timeout_s, old.memory_limit_mb, "",
                                old.retry.max_retries)
            await self._ensure_queue(old.queue)
            await self._enqueue(record, message)
            self.store.remove_dead_letters([letter.task_id])
            renamed[letter.task_id] = message.task_id
        return renamed

    async def purge_dead_letters(self) -> int:
        return await maintenance.purge_dead_letters(self.store)

    def _codec(self, task_type: str) -> str:
        declared = self.registry.types.get(task_type)
        return declared.codec if declared else "text"

    # -- events ----------------------------------------------------------------------

    async def start_events(self, server_id: str) -> None:
        """Consume this replica's durable events and dead-letter queues into the store,
        and start the retention sweep."""
        await topology.declare_cancel_stream(self.broker)  # cancels are kept even before any worker runs
        heartbeats = await topology.declare_heartbeats_queue(self.broker, server_id)
        await self.broker.consume(heartbeats, self._on_heartbeat, EVENTS_PREFETCH)
        events = await topology.declare_events_queue(self.broker, server_id)
        dead = await topology.declare_dead_queue(self.broker, server_id)
        self._tasks = [asyncio.create_task(self._apply_events(), name="events-applier"),
                       asyncio.create_task(self._sweep_retention(), name="retention"),
                       asyncio.create_task(self._refresh_store_gauges(), name="store-gauges"),
                       asyncio.create_task(self._publish_unconfirmed_until_done(), name="unconfirmed")]
        await self.broker.consume(events, self._events.put_nowait, EVENTS_PREFETCH)
        await self.broker.consume(dead, self._on_dead_letter, EVENTS_PREFETCH)

    async def stop_events(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
        self._apply(events)
        for delivery in deliveries:
            self.broker.ack(delivery)

    def _apply(self, events: list[TaskEvent]) -> None:
        changes = self.store.apply(events, self._codecs)
        for record in changes:
            self.hub.publish(record)
        now = time.time()
        for event in events:
            self.metrics.events.labels(event.state.name).inc()
            self.metrics.events_lag_seconds.observe(max(0.0, now - event.at_s))
        changed = {record.task_id for record in changes}
        for event in events:  # a worker that missed the cancel (started after it) is told again
            # A start that changed nothing came for a task already final: cancelled, maybe.
            # (Any other start counts as one, so only these need the store look-up.)
            if (event.state is TaskState.RUNNING and event.task_id not in changed
                    and self._is_cancelled(event.task_id)):
                self._recancel(event.task_id)
        self._watch_for_poison(changes)

    async def _refresh_store_gauges(self) -> None:
        """Sizes from the store's counters (kept in its transactions: no COUNT(*) here)."""
        while True:
            self.metrics.store_tasks.set(self.store.count())
            self.metrics.store_dead_letters.set(self.store.count_dead_letters())
            await asyncio.sleep(STORE_GAUGES_INTERVAL_S)

    def _watch_for_poison(self, changes: list[TaskRecord]) -> None:
        """A task started delivery_limit times without an outcome takes its worker down
        each time: tell every worker (through the cancel stream) to dead-letter it when it
        next arrives. Counting starts, not deliveries, spares the tasks that were only
        waiting in the dying workers' buffers."""
        for record in changes:
            if (record.state is TaskState.RUNNING and record.starts >= self.delivery_limit
                    and record.task_id not in self._poison_reported):
                self._poison_reported.add(record.task_id)
                log.warning("task %s (%s) started %d times without finishing: poison", record.task_id,
                            record.type, record.starts)
                self._send_control(record.task_id, "poison", f"{record.starts}")

    def _recancel(self, task_id: str) -> None:
        self._send_control(task_id, "cancel")

    def _send_control(self, task_id: str, command: str, detail: str = "") -> None:
        async def send() -> None:
            try:
                await self.broker.publish(topology.CONTROL_EXCHANGE, "", task_id.encode(),
                                          {"qm-command": command, "qm-detail": detail})
            except BrokerUnavailable as exc:
                log.warning("task %s: cannot tell workers %s: %s", task_id, command, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _is_cancelled(self, task_id: str) -> bool:
        record = self.store.get(task_id)
        return record is not None and record.state is TaskState.CANCELLED

    def _on_dead_letter(self, delivery: Delivery) -> None:
        """Record a dead letter. One that RabbitMQ dead-lettered itself (the quorum queue's
        delivery limit: its worker died every time) has no final event yet: make it one."""
        try:
            message = TaskMessage.decode(delivery.body)
        except ValueError as exc:
            log.error("dropping an undecodable dead letter (headers %s): %s", delivery.headers, exc)
            self.broker.ack(delivery)
            return
        headers = delivery.headers
        reason = headers.get(topology.DEAD_REASON_HEADER)
        if reason is None:
            reason = rabbitmq_dead_reason(headers, self.delivery_limit)
            error = (f"RabbitMQ dead-lettered task {message.task_id}: {reason}. A task that takes its "
                     "whole worker down each time (not just a child) ends here instead of looping")
            self._apply([TaskEvent(message.task_id, message.type, message.queue, message.attempt,
                                   TaskState.CRASHED, error=error)])
            state = TaskState.CRASHED
        else:
            error = str(headers.get("qm-error", ""))
            state = TaskState[str(headers.get("qm-state", "FAILED"))]
        self.store.add_dead_letter(DeadLetter(message.task_id, message.type, message.queue, state,
                                              message.attempt, str(reason), error, delivery.body, time.time()))
        log.warning("task %s (%s) dead-lettered: %s", message.task_id, message.type, reason)
        self.metrics.dead_letters.labels(message.type if message.type in self.registry.types else "unknown").inc()
        self.broker.ack(delivery)

    def _on_heartbeat(self, delivery: Delivery) -> None:
        self.broker.ack(delivery)
        try:
            beat = Heartbeat.decode(delivery.body)
        except ValueError as exc:
            log.error("dropping an undecodable heartbeat: %s", exc)
            return
        self._workers[beat.worker_id] = (beat, time.time())

    def workers(self) -> list[tuple[Heartbeat, float, str]]:
        """Every worker heard from: its last heartbeat, when it arrived, and its state."""
        now = time.time()
        listed = []
        for beat, seen_at in sorted(self._workers.values(), key=lambda item: item[0].worker_id):
            if beat.stopped:
                state = "stopped"
            elif now - seen_at > self.worker_lost_after_s:
                state = "lost"
            else:
                state = "draining" if beat.draining else "active"
            listed.append((beat, seen_at, state))
        return listed

    async def _sweep_retention(self) -> None:
        """Forget finished tasks (and so their idempotency keys) older than the retention."""
        while True:
            removed = await maintenance.purge_finished(self.store, time.time() - self.retention_s)
            if removed:
                log.info("retention: removed %d task(s) finished over %g s ago", removed, self.retention_s)
            await asyncio.sleep(min(self.retention_s / 10, RETENTION_SWEEP_MAX_S))


def rabbitmq_dead_reason(headers: dict, delivery_limit: int) -> str:
    """Why RabbitMQ dead-lettered a message, from its x-death header."""
    deaths = headers.get("x-death") or [{}]
    reason = str(deaths[0].get("reason", "unknown"))
    if reason == "delivery_limit":
        return f"delivered {delivery_limit} times without finishing (broker.delivery_limit)"
    return f"dead-lettered by RabbitMQ ({reason})"
