"""Dead letters: tasks that failed for good, kept with the message that can run them again.

Workers send a task message to the `qm.dead` exchange with why it died (protocol
headers); RabbitMQ sends one there itself when a quorum work queue's delivery limit (the
backstop) is reached. Each server keeps its own queue on the exchange and records what
arrives in its store: `qm dead list / requeue / purge`.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import time
from typing import Awaitable, Callable

from qm.background import Background
from qm.broker import topology
from qm.broker.base import Broker, Delivery, publish_until_confirmed
from qm.errors import StoreUnavailable, TaskNotFound
from qm.ids import time_ordered_id
from qm.messages import TaskEvent, TaskMessage, decode_bundle, decode_tasks, is_bundle
from qm.metrics import ServerMetrics
from qm.protocol import Header
from qm.server import maintenance
from qm.server.events import STORE_RETRY_MAX_S, STORE_RETRY_MIN_S
from qm.server.store_api import DeadLetter, TaskRecord, TaskStore
from qm.states import TaskState

log = logging.getLogger(__name__)

#: Dead letters listed when the request names no limit, and the most one requeue moves.
DEFAULT_DEAD_LETTER_LIMIT = 100
MAX_REQUEUE = 10_000
#: Most dead letters one ListDeadLetters answers, unless server.max_dead_letters_listed says otherwise.
MAX_LISTED = 1000
#: How long a dead letter is kept, unless server.dead_letter_retention_s says otherwise (30 days).
RETENTION_S = 30 * 86400.0


class DeadLetters:
    """This server's dead letters: recorded from its queue, listed, requeued, purged."""

    def __init__(
        self,
        store: TaskStore,
        broker: Broker,
        metrics: ServerMetrics,
        codecs: dict[str, str],
        delivery_limit: int,
        apply: Callable[[list[TaskEvent]], Awaitable[None]],
        enqueue: Callable[[TaskRecord, TaskMessage], Awaitable[object]],
    ) -> None:
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.codecs = codecs
        self.delivery_limit = delivery_limit
        self._apply = apply  # events → store (the event applier)
        self._enqueue = enqueue  # store + publish a new task (the submit path)
        self.origin = ""  # the store this server's tasks are in (Header.ORIGIN of its bundles)
        self._background = Background()
        self.max_listed = MAX_LISTED
        self.retention_s = RETENTION_S

    def on_delivery(self, delivery: Delivery) -> None:
        """The consumer's callback: record the dead letter on the event loop, then ack it."""
        self._background.spawn(self._record_logged(delivery), name="dead-letter")

    async def wait_recorded(self, timeout_s: float | None = None) -> None:
        """Wait for the dead letters being recorded (before the store closes)."""
        await self._background.wait(timeout_s)

    async def _record_logged(self, delivery: Delivery) -> None:
        delay_s = STORE_RETRY_MIN_S
        while True:
            try:
                await self.record(delivery)
                return
            except StoreUnavailable as exc:  # a PostgreSQL restart: unacked until recorded
                log.warning("dead letter waits for the store (again in %.1f s): %s", delay_s, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, STORE_RETRY_MAX_S)
            except Exception:  # unacked: RabbitMQ delivers it again after a reconnect
                log.exception("cannot record a dead letter (headers %s)", delivery.headers)
                return

    async def record(self, delivery: Delivery) -> None:
        """Record a dead letter, then ack it: each task of a bundle (messages.TaskBundle)
        as a dead letter of its own (recorded again if this is cut short: an upsert). A
        bundle a worker rejected (a worker older than bundles: today's reject only bundles
        that do not decode) is no failure: its tasks go back to their queues, one a message,
        published by the servers of the store they are in (Header.ORIGIN): with a store
        per server every server reads every dead letter, and only one may publish them."""
        if not is_bundle(delivery.headers):
            await self._record_task(delivery.body, delivery.headers)
        else:
            try:
                bodies = decode_bundle(delivery.body)
            except ValueError as exc:
                bodies = []
                log.error("dropping an undecodable dead bundle (headers %s): %s", delivery.headers, exc)
            if bodies and _rejected(delivery.headers):
                origin = delivery.headers.get(Header.ORIGIN)
                if origin in (None, self.origin):  # else its own servers publish it again
                    await self._unbundle(bodies)
            else:
                headers = {key: value for key, value in delivery.headers.items() if key != Header.BUNDLE}
                for body in bodies:
                    await self._record_task(body, headers)
        self.broker.ack(delivery)

    async def _unbundle(self, bodies: builtins.list[bytes]) -> None:
        """Publish the tasks of a rejected bundle again, each a message of its own (confirmed)."""
        tasks, errors = decode_tasks(bodies)
        for exc in errors:
            log.error("dropping an undecodable task of a rejected bundle: %s", exc)
        for body, message in tasks:
            await publish_until_confirmed(
                self.broker,
                topology.TASKS_EXCHANGE,
                message.routing_key,
                body,
                message.headers(),
                f"task {message.task_id}",
            )
        log.warning(
            "a worker rejected a bundle of %d tasks (older than bundles?): published again one a message", len(bodies)
        )

    async def _record_task(self, body: bytes, headers: dict) -> None:
        """Record one dead task. One that RabbitMQ dead-lettered itself (the quorum queue's
        delivery limit: its worker died every time) has no final event yet: make it one."""
        try:
            message = TaskMessage.decode(body)
        except ValueError as exc:
            log.error("dropping an undecodable dead letter (headers %s): %s", headers, exc)
            return
        reason = headers.get(Header.DEAD_REASON)
        if reason is None:
            reason = rabbitmq_dead_reason(headers, self.delivery_limit)
            error = (
                f"RabbitMQ dead-lettered task {message.task_id}: {reason}. A task that takes its "
                "whole worker down each time (not just a child) ends here instead of looping"
            )
            await self._apply(
                [
                    TaskEvent(
                        message.task_id, message.type, message.queue, message.attempt, TaskState.CRASHED, error=error
                    )
                ]
            )
            state = TaskState.CRASHED
        else:
            error = str(headers.get(Header.ERROR, ""))
            state = TaskState[str(headers.get(Header.STATE, "FAILED"))]
        await self.store.add_dead_letter(
            DeadLetter(
                message.task_id,
                message.type,
                message.queue,
                state,
                message.attempt,
                str(reason),
                error,
                body,
                time.time(),
            )
        )
        log.warning("task %s (%s) dead-lettered: %s", message.task_id, message.type, reason)
        self.metrics.dead_letters.labels(message.type if message.type in self.codecs else "unknown").inc()

    async def list(self, limit: int) -> tuple[builtins.list[DeadLetter], int]:
        """The oldest dead letters, at most `limit` (0 = the default) and never over
        max_listed; their message bodies are not read (the answer carries none)."""
        return await self.store.dead_letters(min(limit or DEFAULT_DEAD_LETTER_LIMIT, self.max_listed), bodies=False)

    async def expire(self, now_s: float) -> int:
        """Forget dead letters older than the retention, in batches; return how many."""
        return await maintenance.purge_dead_letters(self.store, dead_before_s=now_s - self.retention_s)

    async def requeue(self, task_ids: builtins.list[str] | None) -> dict[str, str]:
        """Run dead-lettered tasks again, each as a new task (attempt 1, same payload and
        limits); returns old id → new id. Unknown ids raise TaskNotFound.

        Each letter is taken out of the store before its task is enqueued (and put back
        if that fails): with a store shared by several servers, two requeueing the same
        letter at once make one new task; the one that finds it gone leaves it out."""
        dead, _total = await self.store.dead_letters(MAX_REQUEUE, task_ids)
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
            message = dataclasses.replace(old, task_id=time_ordered_id(), attempt=1, enqueued_at_s=now)
            record = TaskRecord.queued(
                message.task_id,
                old.type,
                old.queue,
                self.codecs.get(old.type, "text"),
                now,
                old.timeout_s,
                old.memory_limit_mb,
                max_retries=old.retry.max_retries,
                priority=old.priority,  # and its message goes back to that priority's band
                cpus=old.cpus,
            )
            if not await self.store.remove_dead_letters([letter.task_id]):
                continue  # another server took it a moment ago, and requeues it
            try:
                await self._enqueue(record, message)
            except BaseException:
                await self.store.add_dead_letter(letter)  # nothing was requeued: keep it listed
                raise
            renamed[letter.task_id] = message.task_id
        return renamed

    async def purge(self) -> int:
        """Remove every dead letter, in batches that let the event loop serve between them."""
        return await maintenance.purge_dead_letters(self.store)


def _rejected(headers: dict) -> bool:
    """Whether a consumer rejected the message (basic.nack without requeue), by x-death."""
    deaths = headers.get("x-death") or [{}]
    return str(deaths[0].get("reason", "")) == "rejected"


def rabbitmq_dead_reason(headers: dict, delivery_limit: int) -> str:
    """Why RabbitMQ dead-lettered a message, from its x-death header."""
    deaths = headers.get("x-death") or [{}]
    reason = str(deaths[0].get("reason", "unknown"))
    if reason == "delivery_limit":
        return f"delivered {delivery_limit} times without finishing (broker.delivery_limit)"
    return f"dead-lettered by RabbitMQ ({reason})"
