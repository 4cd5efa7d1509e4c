"""The supervisor's progress publisher: one rate limiter per running task, events out.

Progress events are advisory (qm/task_progress.py): each is published once, without
retrying; RabbitMQ away means it is dropped (and counted). They go through the outcome
events' publisher (qm/worker/event_packs.py), after the events waiting there, so a task's
RUNNING event comes first. The outcome path (qm/worker/outcomes.py) never waits for one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from qm.background import Background
from qm.errors import BrokerUnavailable
from qm.messages import TaskEvent, TaskMessage
from qm.metrics import WorkerMetrics
from qm.states import TaskState
from qm.task_progress import Progress
from qm.worker.event_packs import EventPacks
from qm.worker.progress import ProgressLimiter

log = logging.getLogger(__name__)


class ProgressEvents:
    """`open(message)` → the limiter for that running attempt; `close` it before its outcome."""

    def __init__(self, events: EventPacks, worker_id: str, metrics: WorkerMetrics, background: Background) -> None:
        self.events = events  # the outcome events' publisher: reports keep their order with them
        self.worker_id = worker_id
        self.metrics = metrics
        self._background = background

    def open(self, message: TaskMessage) -> ProgressLimiter:
        loop = asyncio.get_running_loop()

        def send(update: Progress) -> None:
            event = TaskEvent(
                message.task_id,
                message.type,
                message.queue,
                message.attempt,
                TaskState.RUNNING,
                self.worker_id,
                at_s=time.time(),
                progress=update,
            )
            self._background.spawn(self._publish(event))

        return ProgressLimiter(send, loop.call_later)

    def close(self, limiter: ProgressLimiter) -> None:
        dropped_at_end = limiter.close()
        if limiter.coalesced:
            self.metrics.progress_dropped.labels("rate_limit").inc(limiter.coalesced)
        if dropped_at_end:
            self.metrics.progress_dropped.labels("ended").inc(dropped_at_end)

    async def _publish(self, event: TaskEvent) -> None:
        try:
            await self.events.publish_advisory(event)
        except BrokerUnavailable as exc:
            self.metrics.progress_dropped.labels("broker").inc()
            log.debug("task %s: progress update dropped: %s", event.task_id, exc)
            return
        self.metrics.progress_events.inc()
