"""Belt and braces for at-least-once: find tasks whose message RabbitMQ may have lost and
publish them again from the copy the store keeps until a task is final.

A task is looked at when it is
- RUNNING and its time limit ran out over `after_s` ago (the worker would have killed it
  and reported; the message was lost with the worker, or dropped on a dead-lettering);
- RETRYING and its next attempt was due over `after_s` ago, SCHEDULED (a delayed task,
  qm/scheduling.py) and due over `after_s` ago, or QUEUED for over `after_s`, while its
  work queue holds no ready message: it is not waiting behind a backlog there (the delayed
  message never came back: a dead-lettering RabbitMQ dropped). A SCHEDULED task not yet
  due is never published: its message waits in a delay tier.
Such a task is published again to its work queue (the next attempt for a retry, the same
attempt otherwise). A duplicate is harmless: attempts are idempotent and events are
ordered by `qm.states.supersedes`. Each publish is logged with the task id and counted
(`qm_server_reconciled_total{state}`); a task is published again at most once per
`after_s`. Every look-up is an indexed range over unfinished tasks (qm/server/store.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

from qm import priority as priorities
from qm.broker import topology
from qm.broker.base import Broker
from qm.errors import BrokerUnavailable, StoreUnavailable
from qm.messages import TaskMessage
from qm.metrics import ServerMetrics
from qm.server.store_api import TaskRecord, TaskStore
from qm.states import TaskState

log = logging.getLogger(__name__)

#: Most tasks of one kind looked at per sweep (the rest wait for the next sweep).
SWEEP_LIMIT = 500
#: A server sweeps when no server of its store swept in the last TURN_FRACTION x interval:
#: below 1, so the server whose turn it was keeps it despite its timer's jitter.
TURN_FRACTION = 0.5


@dataclasses.dataclass
class Reconciler:
    store: TaskStore
    broker: Broker
    metrics: ServerMetrics
    queues: set[str]  # logical queues this server publishes to
    #: declares the work queue a task goes to (once): queue, priority, cpus
    ensure_queue: Callable[[str, int, int], Awaitable[None]]
    interval_s: float = 30.0
    after_s: float = 60.0
    #: logical queue → the multi-CPU sizes whose work queues this server declared
    sizes: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    _republished_at: dict[str, float] = dataclasses.field(default_factory=dict)

    async def run(self) -> None:
        """Sweep every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except BrokerUnavailable as exc:
                log.warning("reconciler: RabbitMQ unavailable, next sweep in %g s: %s", self.interval_s, exc)
            except StoreUnavailable as exc:
                log.warning("reconciler: store unavailable, next sweep in %g s: %s", self.interval_s, exc)

    async def sweep(self, now_s: float | None = None) -> int:
        """Publish again every task that looks lost; return how many. With a store shared
        by several servers, one of them sweeps per interval (the store says which)."""
        if not await self.store.claim_reconcile(self.interval_s * TURN_FRACTION):
            return 0
        now_s = time.time() if now_s is None else now_s
        cutoff = now_s - self.after_s
        suspects = [(record, record.attempts) for record in await self.store.overdue_runs(cutoff, SWEEP_LIMIT)]
        for queue in sorted(self.queues):
            if await self._backlog(queue):
                continue  # a backlog: overdue tasks may well be waiting in it
            suspects += [
                (record, record.attempts + 1) for record in await self.store.overdue_retries(queue, cutoff, SWEEP_LIMIT)
            ]
            suspects += [(record, 1) for record in await self.store.overdue_scheduled(queue, cutoff, SWEEP_LIMIT)]
            suspects += [(record, 1) for record in await self.store.queued_before(queue, cutoff, SWEEP_LIMIT)]
        republished = 0
        for record, attempt in suspects:
            if self._republished_at.get(record.task_id, 0.0) > cutoff:
                continue  # published again less than after_s ago: give it time
            if await self._republish(record, attempt, now_s):
                republished += 1
        looked_at = {record.task_id for record, _attempt in suspects}
        self._republished_at = {task_id: at for task_id, at in self._republished_at.items() if task_id in looked_at}
        return republished

    async def _backlog(self, queue: str) -> bool:
        """Whether any work queue of `queue` holds ready messages: each priority band's and
        each multi-CPU size's this server declared (an absent one: none)."""
        names = [topology.work_queue_name(queue, priority=band) for band in priorities.band_priorities()]
        names += [topology.work_queue_name(queue, cpus=cpus) for cpus in sorted(self.sizes.get(queue, ()))]
        for name in names:
            if await self.broker.queue_size(name):
                return True
        return False

    async def _republish(self, record: TaskRecord, attempt: int, now_s: float) -> bool:
        body = await self.store.message(record.task_id)
        if body is None:
            log.debug(
                "task %s looks lost but was submitted through another server; that one publishes it", record.task_id
            )
            return False
        message = dataclasses.replace(TaskMessage.decode(body), attempt=max(1, attempt), enqueued_at_s=now_s)
        await self.ensure_queue(message.queue, message.priority, message.cpus)
        await self.broker.publish(topology.TASKS_EXCHANGE, message.routing_key, message.encode(), message.headers())
        self._republished_at[record.task_id] = now_s
        self.metrics.reconciled.labels(record.state.name).inc()
        log.warning(
            "reconciler: task %s (%s) %s since %s looked lost; published attempt %d again to %s",
            record.task_id,
            record.type,
            record.state.name,
            _since(record),
            message.attempt,
            message.queue,
        )
        return True


def _since(record: TaskRecord) -> str:
    at = {
        TaskState.RETRYING: record.next_attempt_at,
        TaskState.SCHEDULED: record.next_attempt_at,
        TaskState.RUNNING: record.started_at,
    }.get(record.state, record.created_at)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at or record.updated_at))
