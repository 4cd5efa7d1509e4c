"""Server logic, free of gRPC: validate → record → publish (confirmed) → answer.

The other jobs of a server live next door and are composed here: event ingestion
(events.py), dead letters (dead_letters.py), the worker directory (workers.py), the
reconciler (reconciler.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable, Sequence

from qm import limits as task_limits
from qm import priority as priorities
from qm import retry, schedules, scheduling
from qm.broker import topology
from qm.broker.base import Broker
from qm.broker.migrate import migrate_legacy_delay_tiers
from qm.errors import (
    BrokerUnavailable,
    IdempotencyKeyReused,
    IdempotencyKeyTaken,
    PublishOutcomeUnknown,
    QMError,
    StoreUnavailable,
    TaskAlreadyFinished,
    TaskNotFound,
    ValidationError,
)
from qm.ids import time_ordered_id
from qm.messages import TaskEvent, TaskMessage
from qm.metrics import ServerMetrics
from qm.protocol import Command, Control, Header
from qm.registry import Registry
from qm.retry import RetryPolicy
from qm.security import signing
from qm.server import bundling, fit, idempotency, maintenance
from qm.server.caps import SubmitCaps
from qm.server.dead_letters import DeadLetters
from qm.server.events import EventApplier
from qm.server.fit import DEFAULT_MAX_TASK_CPUS
from qm.server.groups import Groups
from qm.server.hub import Hub
from qm.server.reconciler import Reconciler
from qm.server.scheduler import DEFAULT_MAX_SCHEDULES, SCHEDULE_KEY_PREFIX, Scheduler
from qm.server.store_api import TaskRecord, TaskStore
from qm.server.submission import Submission
from qm.server.validators import PayloadValidators
from qm.server.workers import WorkerDirectory
from qm.states import TaskState

log = logging.getLogger(__name__)

#: Unacked events the server's events consumer may hold (applied in batches).
EVENTS_PREFETCH = 1000
#: Longest idempotency key accepted.
MAX_IDEMPOTENCY_KEY_CHARS = 200
#: Most items one SubmitTasks call may carry, unless server.max_batch_items says otherwise.
DEFAULT_MAX_BATCH_ITEMS = 1000
#: Pause between attempts to publish tasks a crash left unconfirmed, while RabbitMQ is away.
UNCONFIRMED_RETRY_S = 5.0
#: Least time between two updates of the store size gauges.
STORE_GAUGES_INTERVAL_S = 5.0
#: Longest wait at stop for dead letters still being recorded.
STOP_WAIT_S = 5.0
#: Longest pause between two retention sweeps.
RETENTION_SWEEP_MAX_S = 3600.0


class TaskService:
    """What the TaskQueue RPCs do: submit, status, cancel; and the server's parts."""

    def __init__(
        self,
        registry: Registry,
        store: TaskStore,
        broker: Broker,
        *,
        max_payload_bytes: int,
        queue_type: str = "quorum",
        delivery_limit: int = 5,
        server_queue_type: str = "classic",
        default_timeout_s: float = 600.0,
        default_memory_limit_mb: int = 0,
        consumer_timeout_s: float = 1800.0,
        default_retry: RetryPolicy = RetryPolicy(),
        retention_s: float = 7 * 86400.0,
        metrics: ServerMetrics | None = None,
        worker_lost_after_s: float = 30.0,
        reconcile_interval_s: float = 30.0,
        reconcile_after_s: float = 60.0,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_delay_s: float = scheduling.DEFAULT_MAX_DELAY_S,
        caps: SubmitCaps | None = None,
        validators: PayloadValidators | None = None,
        max_queue_length: int = 0,
        schedule_grace_s: float = schedules.DEFAULT_GRACE_S,
        max_schedules: int = DEFAULT_MAX_SCHEDULES,
        max_task_cpus: int = DEFAULT_MAX_TASK_CPUS,
        bundle_max_tasks: int = bundling.DEFAULT_BUNDLE_MAX_TASKS,
    ) -> None:
        self.registry = registry
        self._codecs = {name: declared.codec for name, declared in registry.types.items()}
        self.store = store
        self.broker = broker
        self.hub = Hub()
        self.max_payload_bytes = max_payload_bytes
        self.max_batch_items = max_batch_items
        self.queue_type = queue_type
        self.server_queue_type = server_queue_type  # of this server's events, dead-letter, heartbeat queues
        self.delivery_limit = delivery_limit
        self.default_timeout_s = default_timeout_s
        self.default_memory_limit_mb = default_memory_limit_mb
        self.consumer_timeout_s = consumer_timeout_s
        self.default_retry = default_retry
        self.retention_s = retention_s
        self.max_delay_s = max_delay_s
        self.caps = caps or SubmitCaps()  # qm/server/caps.py: allowed queues, server-wide maxima
        self.validators = validators or PayloadValidators()  # off the event loop, within a budget
        self.max_queue_length = max_queue_length
        self.metrics = metrics or ServerMetrics()
        self._declared_queues: set[str] = set()  # logical queues (for the reconciler)
        self._declared_work_queues: set[str] = set()  # declared so far: one per band and size used
        self._declared_sizes: dict[str, set[int]] = {}  # logical queue → declared cpus > 1
        self.max_task_cpus = max_task_cpus
        self._declared_tiers: set[int] = set()
        self._pending_keys: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.groups = Groups(
            store,
            broker,
            self.metrics,
            self.prepare_item,
            self._publish_message,
            self._publish_unconfirmed,
            self._ensure_queue,
            max_batch_items,
            MAX_IDEMPOTENCY_KEY_CHARS,
        )
        self.run_times = bundling.RunTimes(frozenset(registry.types))  # which types are tiny
        self.events = EventApplier(
            store,
            broker,
            self.hub,
            self.metrics,
            self._codecs,
            delivery_limit,
            self.groups.publish_callback,
            self.run_times.observe,
        )
        self.dead_letters = DeadLetters(
            store, broker, self.metrics, self._codecs, delivery_limit, self.events.apply, self.enqueue
        )
        self.workers = WorkerDirectory(broker, worker_lost_after_s)
        self.bundler = bundling.Bundler(  # tiny tasks of a SubmitTasks call, several to a message
            broker, self.run_times, self.workers.all_read, bundle_max_tasks, max_queue_length, self.metrics
        )
        self.reconciler = Reconciler(
            store,
            broker,
            self.metrics,
            self._declared_queues,
            self._ensure_queue,
            reconcile_interval_s,
            reconcile_after_s,
            self._declared_sizes,
        )
        self.scheduler = Scheduler(self, schedule_grace_s, max_schedules)  # periodic schedules

    # -- submit / status -------------------------------------------------------------

    async def validate(self, task_type: str, payload: bytes, queue: str) -> None:
        """Raise ValidationError naming the field unless the submission is acceptable."""
        if not task_type:
            raise ValidationError("type", "missing; name a task type (see the installed plugins)")
        declared = self.registry.get(task_type)
        self.caps.check_queue(queue)
        if len(payload) > self.max_payload_bytes:
            raise ValidationError(
                "payload",
                f"{len(payload)} bytes exceeds the limit of {self.max_payload_bytes} bytes (server.max_payload_bytes)",
            )
        await self.validators.check(declared, payload)

    async def submit(
        self,
        task_type: str,
        payload: bytes,
        queue: str = "",
        *,
        timeout_s: float = 0.0,
        memory_limit_mb: int = 0,
        idempotency_key: str = "",
        soft_timeout_s: float = 0.0,
        delay_s: float | None = None,
        not_before_s: float | None = None,
        priority: int | None = None,
        cpus: int = 0,
        **retry_options,
    ) -> TaskRecord:
        """Accept a task: it is durable in RabbitMQ when this returns.

        With an idempotency key already seen (within the retention) and the same request,
        the first task is returned and nothing is enqueued; with another request,
        IdempotencyKeyReused (qm/server/idempotency.py). `retry_options` are RetryPolicy
        fields (max_retries, backoff_s, backoff_max_s, jitter, on_timeout); None = default.
        `delay_s` or `not_before_s` (epoch seconds) make a SCHEDULED task (qm/scheduling.py).
        `priority` 0-9 (None = the task type's default, else 5; qm/priority.py).
        `cpus`: CPU slots it takes on a worker; 0 = the task type's (qm/server/fit.py).
        """
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise ValidationError("idempotency_key", f"longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        priorities.resolve(priority, None)  # out of range: refused before any key look-up
        if idempotency_key.startswith(SCHEDULE_KEY_PREFIX):
            raise ValidationError(
                "idempotency_key",
                f"keys starting with {SCHEDULE_KEY_PREFIX!r} are the periodic schedules' own; choose another key",
            )
        digest = ""
        if idempotency_key:
            digest = idempotency.request_digest(
                task_type,
                payload,
                queue or topology.DEFAULT_QUEUE,
                timeout_s,
                memory_limit_mb,
                retry_options,
                soft_timeout_s,
                {"delay_s": delay_s, "not_before_s": not_before_s},
                priority,
                cpus,
            )
            if idempotency_key in self._pending_keys:  # the same key is being submitted right now
                first = await asyncio.shield(self._pending_keys[idempotency_key])
                self._check_key_reuse(idempotency_key, first, digest)
                return first
        # A key seen before is found by the store's insert (IdempotencyKeyTaken), in its
        # transaction, not by a look-up ahead of every submit (one read on the loop each).
        future = asyncio.get_running_loop().create_future()
        if idempotency_key:
            self._pending_keys[idempotency_key] = future
        try:
            existing: TaskRecord | None = None
            try:
                record, message = await self.prepare(
                    task_type,
                    payload,
                    queue or topology.DEFAULT_QUEUE,
                    timeout_s,
                    memory_limit_mb,
                    idempotency_key,
                    retry_options,
                    soft_timeout_s,
                    digest,
                    scheduling.Delay(delay_s, not_before_s),
                    requested_priority=priority,
                    cpus=cpus,
                )
            except QMError:  # refused before anything was stored: a repeat of a stored task?
                existing = await self.store.find_by_idempotency_key(idempotency_key) if idempotency_key else None
                if existing is None:
                    raise
            else:
                try:
                    await self.enqueue(record, message)
                except IdempotencyKeyTaken:  # a task stored under this key before (here or elsewhere)
                    existing = await self._taken(idempotency_key)
            if existing is not None:
                record = await self._answer_duplicate(idempotency_key, existing, digest)
            else:
                self.metrics.submissions.labels(task_type, "accepted").inc()
            future.set_result(record)
            return record
        except BaseException as exc:
            self._count_refusal(task_type, exc)
            future.set_exception(exc)
            future.exception()  # retrieved: a lone submit has no one else waiting on it
            raise
        finally:
            self._pending_keys.pop(idempotency_key, None)

    async def _answer_duplicate(self, key: str, existing: TaskRecord, digest: str) -> TaskRecord:
        """A repeated submit: the first task, once its message is durable (it may still be
        unconfirmed, stored by a crashed run or by another server of a shared store)."""
        self._check_key_reuse(key, existing, digest)
        await self._publish_unconfirmed(existing.task_id)  # durable before we say so
        self.metrics.submissions.labels(existing.type, "duplicate").inc()
        return existing

    async def _taken(self, key: str) -> TaskRecord:
        """The task stored under `key` before ours (here, or by another server of a shared
        store: its insert committed before ours failed)."""
        existing = await self.store.find_by_idempotency_key(key)
        if existing is None:  # another server's publish failed and it removed the task again
            raise StoreUnavailable(
                f"idempotency key {key!r} was being submitted through another server, which gave up; submit again"
            )
        return existing

    def _check_key_reuse(self, key: str, first: TaskRecord, digest: str) -> None:
        try:
            idempotency.check_reuse(key, first.request_digest, digest, first.task_id)
        except IdempotencyKeyReused:
            self.metrics.submissions.labels(first.type, "key_reused").inc()
            raise

    async def submit_many(self, items: Sequence[Submission]) -> list[TaskRecord | QMError]:
        """Accept a batch: one outcome per item, in order, the record of an accepted item
        (durable when this returns) or the error that refused it, exactly as `submit`
        would have answered the item alone (idempotency keys included). More than
        max_batch_items items: ValidationError, nothing submitted.

        The items are submitted concurrently; the broker pipelines their confirms, so the
        batch waits about one confirm round trip.
        """
        if len(items) > self.max_batch_items:
            raise ValidationError(
                "items",
                f"{len(items)} items exceed the limit of {self.max_batch_items} "
                "per batch (server.max_batch_items); send smaller batches",
            )

        async def one(item: Submission) -> TaskRecord | QMError:
            try:
                return await self.submit_item(item)
            except QMError as exc:
                return exc

        batch = bundling.BATCH.set(True)  # its tiny tasks may share messages (qm/server/bundling.py)
        try:
            return list(await asyncio.gather(*(one(item) for item in items)))
        finally:
            bundling.BATCH.reset(batch)

    async def submit_item(self, item: Submission) -> TaskRecord:
        """`submit` of a request's decoded fields (qm/server/submission.py)."""
        return await self.submit(
            item.type,
            item.payload,
            item.queue,
            timeout_s=item.timeout_s,
            memory_limit_mb=item.memory_limit_mb,
            idempotency_key=item.idempotency_key,
            soft_timeout_s=item.soft_timeout_s,
            delay_s=item.delay_s,
            not_before_s=item.not_before_s,
            priority=item.priority,
            cpus=item.cpus,
            **item.retry_options,
        )

    async def prepare_item(
        self,
        item: Submission,
        *,
        idempotency_key: str | None = None,
        request_digest: str = "",
        schedule_id: str = "",
        now_s: float | None = None,
    ) -> tuple[TaskRecord, TaskMessage]:
        """`prepare` of a request's decoded fields (a group's member or callback, a
        schedule's tick with the tick's own key)."""
        return await self.prepare(
            item.type,
            item.payload,
            item.queue or topology.DEFAULT_QUEUE,
            item.timeout_s,
            item.memory_limit_mb,
            item.idempotency_key if idempotency_key is None else idempotency_key,
            item.retry_options,
            item.soft_timeout_s,
            request_digest,
            scheduling.Delay(item.delay_s, item.not_before_s),
            schedule_id=schedule_id,
            now_s=now_s,
            requested_priority=item.priority,
            cpus=item.cpus,
        )

    async def _publish_message(self, message: TaskMessage, body: bytes) -> None:
        """Publish a stored task's message (confirmed) to its queue, or its first delay tier."""
        await self._ensure_queue(message.queue, message.priority, message.cpus)
        await self.broker.publish(await self._exchange_for(message), message.routing_key, body, message.headers())

    def _count_refusal(self, task_type: str, error: BaseException) -> None:
        known_type = task_type if task_type in self.registry.types else "unknown"
        if isinstance(error, ValidationError):
            self.metrics.submissions.labels(known_type, "invalid").inc()
            self.metrics.rejects.labels(error.field).inc()
        elif isinstance(error, BrokerUnavailable):
            self.metrics.submissions.labels(known_type, "unavailable").inc()

    async def prepare(
        self,
        task_type: str,
        payload: bytes,
        queue: str,
        timeout_s: float,
        memory_limit_mb: int,
        idempotency_key: str,
        retry_options: dict,
        soft_timeout_s: float = 0.0,
        request_digest: str = "",
        delay: scheduling.Delay = scheduling.NO_DELAY,
        schedule_id: str = "",
        now_s: float | None = None,
        requested_priority: int | None = None,
        cpus: int = 0,
    ) -> tuple[TaskRecord, TaskMessage]:
        """Validate a submission and resolve its limits: its QUEUED (or SCHEDULED) record and
        first message, not yet stored or sent. ValidationError naming the field, or
        BrokerUnavailable while RabbitMQ is away."""
        # The idempotency key travels to validators that need it (qm/security/signing.py: a
        # retried submit is not a replay of its signed payload).
        submission = signing.SUBMISSION_KEY.set(idempotency_key)
        try:
            await self.validate(task_type, payload, queue)
        finally:
            signing.SUBMISSION_KEY.reset(submission)
        declared = self.registry.get(task_type)
        task_priority = priorities.resolve(requested_priority, declared.priority)
        self.caps.check_requested(timeout_s, memory_limit_mb, retry_options)
        cpus = fit.resolve_cpus(declared, cpus, self.max_task_cpus)
        fit.check_fits(cpus, queue, self.workers)
        limits = task_limits.resolve(
            declared,
            timeout_s,
            memory_limit_mb,
            default_timeout_s=self.default_timeout_s,
            default_memory_limit_mb=self.default_memory_limit_mb,
            consumer_timeout_s=self.consumer_timeout_s,
            soft_timeout_s=soft_timeout_s,
            max_timeout_s=self.caps.max_timeout_s,
            max_memory_limit_mb=self.caps.max_memory_limit_mb,
        )
        policy = retry.resolve(declared, self.default_retry, **retry_options)
        policy = dataclasses.replace(policy, max_retries=self.caps.retries(policy.max_retries))
        now = time.time() if now_s is None else now_s
        due_s = delay.due_at(now, self.max_delay_s)
        if not self.broker.connected:
            raise self.broker.unavailable()
        record = TaskRecord.queued(
            time_ordered_id(),
            task_type,
            queue,
            declared.codec,
            now,
            limits.timeout_s,
            limits.memory_limit_mb,
            idempotency_key,
            policy.max_retries,
            request_digest=request_digest,
            due_s=due_s,
            priority=task_priority,
            schedule_id=schedule_id,
            cpus=cpus,
        )
        message = TaskMessage(
            record.task_id,
            task_type,
            payload,
            queue,
            1,
            now,
            limits.timeout_s,
            limits.memory_limit_mb,
            policy,
            limits.soft_timeout_s,
            due_s,
            task_priority,
            cpus,
        )
        return record, message

    async def enqueue(
        self,
        record: TaskRecord,
        message: TaskMessage,
        store: Callable[[bytes], Awaitable[bool]] | None = None,
    ) -> bool:
        """Store (with the message, until confirmed; committed before the publish), publish,
        await the confirm; if the publish fails nothing stays stored. One store transaction:
        the confirm mark rides with the next one. If this process dies before that, the
        stored message is published again at start-up or on the client's retry (same key).

        `store(body)`, if given, stores the task instead of `insert_unconfirmed` (in a
        transaction of its own making, e.g. with a schedule's tick: qm/server/scheduler.py)
        and may decline (False: nothing stored, nothing published, False returned). A task
        stored that way is kept when its publish fails (its caller publishes it again)."""
        await self._ensure_queue(message.queue, message.priority, message.cpus)
        body = message.encode()
        exchange = await self._exchange_for(message)
        if store is None:
            await self.store.insert_unconfirmed(record, message.queue, body)
        elif not await store(body):
            return False
        started = time.perf_counter()
        try:
            if exchange == topology.TASKS_EXCHANGE:
                await self.bundler.publish(message, body)
            else:
                await self.broker.publish(exchange, message.routing_key, body, message.headers())
        except PublishOutcomeUnknown:
            # Sent, but the connection died before the confirm: RabbitMQ may hold the task (a
            # quorum queue on the surviving nodes). Keep it, unconfirmed: the client's retry
            # with the same key publishes it again and gets this id; a task deleted here
            # would run under an id nobody knows, next to the retry's new one.
            log.warning(
                "task %s: connection lost before RabbitMQ confirmed it; kept to be published again", record.task_id
            )
            raise
        except BaseException:
            if store is None:
                await self.store.delete(record.task_id)  # never a stored half-task
            raise
        await self.store.confirm(record.task_id)
        self.metrics.confirm_seconds.observe(time.perf_counter() - started)
        return True

    async def _exchange_for(self, message: TaskMessage) -> str:
        """qm.tasks, or for a delayed task the delay tier it waits in first (qm/scheduling.py),
        counted from its acceptance (a delay of exactly one tier takes one hop)."""
        tier_s = scheduling.hop_tier_s(message.not_before_s, message.enqueued_at_s)
        if tier_s is None:
            return topology.TASKS_EXCHANGE
        if tier_s not in self._declared_tiers:
            await topology.declare_delay_tier(self.broker, tier_s)
            self._declared_tiers.add(tier_s)
        return topology.delay_tier_name(tier_s)

    async def publish_unconfirmed(self, task_id: str) -> None:
        """Publish the task again if its message was never confirmed (see below)."""
        await self._publish_unconfirmed(task_id)

    async def _publish_unconfirmed(self, task_id: str | None = None) -> None:
        """Publish again what a previous run of this server stored but never saw confirmed
        (at-least-once: it may have reached RabbitMQ; a duplicate delivery is harmless)."""
        for stored_id, queue, body in await self.store.unconfirmed(task_id):
            record = await self.store.get(stored_id)
            if record is not None and record.state is not TaskState.QUEUED:
                # A worker reported on it: the message reached RabbitMQ, only its confirm
                # mark was not written (they are deferred): publishing it again would run it twice.
                await self.store.confirm(stored_id)
                continue
            message = TaskMessage.decode(body)
            await self._ensure_queue(queue, message.priority, message.cpus)
            await self.broker.publish(topology.TASKS_EXCHANGE, message.routing_key, body, message.headers())
            await self.store.confirm(stored_id)
            log.info("task %s: published again (its first publish was never confirmed)", stored_id)

    async def _publish_unconfirmed_until_done(self) -> None:
        """At start-up: the rows left unconfirmed by the previous run (not the ones this
        run is publishing right now)."""
        left = [task_id for task_id, _queue, _body in await self.store.unconfirmed()]
        while left:
            try:
                await self._publish_unconfirmed(left[0])
                left.pop(0)
            except BrokerUnavailable as exc:
                log.warning("cannot yet publish tasks left unconfirmed by a crash: %s", exc)
                await self.broker.wait_connected(UNCONFIRMED_RETRY_S)
            except StoreUnavailable as exc:
                log.warning("cannot yet publish tasks left unconfirmed by a crash: %s", exc)
                await asyncio.sleep(UNCONFIRMED_RETRY_S)

    async def _ensure_queue(self, queue: str, priority: int = priorities.DEFAULT_PRIORITY, cpus: int = 1) -> None:
        """Declare the work queue a task of `queue`, `priority` and `cpus` goes to (once,
        TaskMessage.routing_key): a band's or a size's queue exists from the first task of
        it on; workers declare every band and the sizes that fit them."""
        name = topology.work_queue_name(queue, priority=priority, cpus=cpus)
        if name not in self._declared_work_queues:
            await topology.declare_work_queue(
                self.broker,
                queue,
                self.queue_type,
                self.delivery_limit,
                self.max_queue_length,
                priority=priority,
                cpus=cpus,
            )
            self._declared_work_queues.add(name)
            if cpus > 1:
                self._declared_sizes.setdefault(queue, set()).add(cpus)
            self._declared_queues.add(queue)

    async def status(self, task_id: str) -> TaskRecord:
        record = await self.store.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    async def records(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        """The records of those of these tasks that exist, by id: one look-up for many."""
        return {record.task_id: record for record in await self.store.get_many(task_ids)}

    async def cancel(self, task_id: str) -> TaskRecord:
        """Make a task CANCELLED: tell every worker (a queued one is dropped when it comes
        up, a running one killed), then record the final state through the events queue."""
        record = await self.status(task_id)
        if record.state.terminal:
            raise TaskAlreadyFinished(task_id, record.state.name)
        if not self.broker.connected:
            raise self.broker.unavailable()
        await self._broadcast_cancel(task_id)
        event = TaskEvent(
            task_id,
            record.type,
            record.queue,
            max(record.attempts, 1),
            TaskState.CANCELLED,
            error="cancelled by request",
        )
        await self.broker.publish(topology.EVENTS_EXCHANGE, "", event.encode(), {Header.TASK_ID: task_id})
        await self.events.apply([event])  # answer with the final state; the queued copy is then a duplicate
        return await self.status(task_id)

    async def _broadcast_cancel(self, task_id: str) -> None:
        body, headers = Control(Command.CANCEL, task_id).encode()
        await self.broker.publish(topology.CONTROL_EXCHANGE, "", body, headers)

    # -- the server's background jobs ---------------------------------------------------

    async def start_events(self, server_id: str, shared_store_id: str | None = None) -> None:
        """Consume this replica's durable events, dead-letter and heartbeat queues, and
        start the background jobs (event applier, retention, gauges, reconciler).

        With a store shared by several servers (`shared_store_id`), the events and dead
        letters come from the store's queues instead, consumed by all its servers as
        competing consumers: each event is applied once per store. Heartbeats stay per
        server, and their consumer is the exclusive one that refuses a second live server
        under this id."""
        await topology.declare_cancel_stream(self.broker)  # cancels are kept even before any worker runs
        await migrate_legacy_delay_tiers(self.broker, retry.DELAY_TIERS_S)
        for tier_s in retry.DELAY_TIERS_S:  # long before any retry: see Supervisor.start
            await topology.declare_delay_tier(self.broker, tier_s)
        shared = shared_store_id is not None
        heartbeats = await topology.declare_heartbeats_queue(self.broker, server_id, self.server_queue_type)
        await self.broker.consume(heartbeats, self.workers.on_heartbeat, EVENTS_PREFETCH, exclusive=shared)
        events = await topology.declare_events_queue(self.broker, shared_store_id or server_id, self.server_queue_type)
        dead = await topology.declare_dead_queue(self.broker, shared_store_id or server_id, self.server_queue_type)
        # A rejected bundle's tasks are published again by the servers of the store they are in.
        self.bundler.origin = self.dead_letters.origin = shared_store_id or server_id
        self._tasks = [
            asyncio.create_task(self.events.run(), name="events-applier"),
            asyncio.create_task(self._sweep_retention(), name="retention"),
            asyncio.create_task(self._refresh_store_gauges(), name="store-gauges"),
            asyncio.create_task(self._publish_unconfirmed_until_done(), name="unconfirmed"),
            asyncio.create_task(self.reconciler.run(), name="reconciler"),
            asyncio.create_task(self.scheduler.run(), name="schedules"),
        ]
        # Exclusive (one store per server): while this server lives, another one under the
        # same id is refused here (classic queues; RabbitMQ does not enforce it on quorum
        # queues: see topology).
        await self.broker.consume(events, self.events.queue.put_nowait, EVENTS_PREFETCH, exclusive=not shared)
        await self.broker.consume(dead, self.dead_letters.on_delivery, EVENTS_PREFETCH)

    async def stop_events(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dead_letters.wait_recorded(STOP_WAIT_S)
        await self.bundler.wait(STOP_WAIT_S)

    async def _refresh_store_gauges(self) -> None:
        """Sizes from the store's counters (kept in its transactions: no COUNT(*) here)."""
        while True:
            try:
                self.metrics.store_tasks.set(await self.store.count())
                self.metrics.store_dead_letters.set(await self.store.count_dead_letters())
                self.metrics.store_schedules.set(await self.store.count_schedules())
            except StoreUnavailable as exc:
                log.warning("store gauges not updated: %s", exc)
            await asyncio.sleep(STORE_GAUGES_INTERVAL_S)

    async def _sweep_retention(self) -> None:
        """Forget finished tasks (and so their idempotency keys) older than the retention."""
        while True:
            try:
                removed = await maintenance.purge_finished(self.store, time.time() - self.retention_s)
            except StoreUnavailable as exc:
                log.warning("retention sweep put off: %s", exc)
                removed = 0
            if removed:
                log.info("retention: removed %d task(s) finished over %g s ago", removed, self.retention_s)
            expired = await self.dead_letters.expire(time.time())
            if expired:
                log.info(
                    "retention: removed %d dead letter(s) older than %g s (server.dead_letter_retention_s)",
                    expired,
                    self.dead_letters.retention_s,
                )
            await asyncio.sleep(min(self.retention_s / 10, RETENTION_SWEEP_MAX_S))
