"""Event ingestion: the server's own durable events queue → store → stream followers.

A message holds one event or a worker's pack of them (qm/worker/event_packs.py), applied
in order. Events are applied in batches (everything queued at that moment, one
transaction), then acked: an event is never acked before it is stored, so a crash
replays it. After each batch the poison watch looks at the starts counted: a task
started `delivery_limit` times without an outcome is announced to every worker on the
control stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine

from qm.background import Background
from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import BrokerUnavailable, StoreUnavailable
from qm.messages import TaskEvent
from qm.metrics import ServerMetrics
from qm.protocol import Command, Control
from qm.server.hub import Hub
from qm.server.store_api import TaskRecord, TaskStore
from qm.states import TaskState

log = logging.getLogger(__name__)

#: First and longest pause before applying a batch again while the store is unavailable.
STORE_RETRY_MIN_S = 0.2
STORE_RETRY_MAX_S = 2.0


class EventApplier:
    """Applies task events to the store and wakes the streams following them."""

    def __init__(
        self,
        store: TaskStore,
        broker: Broker,
        hub: Hub,
        metrics: ServerMetrics,
        codecs: dict[str, str],
        delivery_limit: int,
        on_callback: Callable[[TaskRecord], Coroutine[Any, Any, None]] | None = None,
        on_run: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.hub = hub
        self.metrics = metrics
        self.codecs = codecs
        self.delivery_limit = delivery_limit
        self.on_callback = on_callback  # publishes a group callback the store just made
        self.on_run = on_run  # (type, run seconds) of each run an outcome reports (qm/server/bundling.py)
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._poison_reported: set[str] = set()
        self._background = Background()

    async def run(self) -> None:
        """Apply what the events consumer queued, batch by batch, until cancelled."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self._apply_until_stored(batch)

    async def _apply_until_stored(self, deliveries: list[Delivery]) -> None:
        """Apply a batch, trying again while the store is unavailable (a PostgreSQL restart):
        the events stay unacked meanwhile, so nothing is lost if this server dies too."""
        delay_s = STORE_RETRY_MIN_S
        while True:
            try:
                await self.apply_deliveries(deliveries)
                return
            except StoreUnavailable as exc:
                log.warning("%d event(s) wait for the store (again in %.1f s): %s", len(deliveries), delay_s, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, STORE_RETRY_MAX_S)

    async def apply_deliveries(self, deliveries: list[Delivery]) -> None:
        """Apply, commit, then ack."""
        events = []
        for delivery in deliveries:
            try:
                events.extend(TaskEvent.decode_all(delivery.body))  # one event, or a worker's pack
            except ValueError as exc:
                log.error("dropping an undecodable event (headers %s): %s", delivery.headers, exc)
        await self.apply(events)
        # One ack frame for the batch: deliveries come in order on one consumer's channel.
        self.broker.ack(deliveries[-1], through=True)

    async def apply(self, events: list[TaskEvent]) -> None:
        changes = await self.store.apply(events, self.codecs)
        for record in changes:
            self.hub.publish(record)
            if _new_callback(record) and self.on_callback is not None:
                self._background.spawn(self.on_callback(record))
        now = time.time()
        for event in events:
            if event.run_s > 0 and self.on_run is not None:  # an outcome, timed by its child
                self.on_run(event.type, event.run_s)
            self.metrics.events.labels("PROGRESS" if event.progress else event.state.name).inc()
            self.metrics.events_lag_seconds.observe(max(0.0, now - event.at_s))
        changed = {record.task_id for record in changes}
        self.metrics.progress_ignored.inc(sum(1 for event in events if event.progress and event.task_id not in changed))
        for event in events:  # a worker that missed the cancel (started after it) is told again
            # A start that changed nothing came for a task already final: cancelled, maybe.
            # (Any other start counts as one, so only these need the store look-up.)
            if (
                event.state is TaskState.RUNNING
                and event.progress is None
                and event.task_id not in changed
                and await self._is_cancelled(event.task_id)
            ):
                self._send(Control(Command.CANCEL, event.task_id))
        self._watch_for_poison(changes)

    def _watch_for_poison(self, changes: list[TaskRecord]) -> None:
        """A task started delivery_limit times without an outcome takes its worker down
        each time: tell every worker (through the control stream) to dead-letter it when it
        next arrives. Counting starts, not deliveries, spares the tasks that were only
        waiting in the dying workers' buffers."""
        for record in changes:
            if (
                record.state is TaskState.RUNNING
                and record.starts >= self.delivery_limit
                and record.task_id not in self._poison_reported
            ):
                self._poison_reported.add(record.task_id)
                log.warning(
                    "task %s (%s) started %d times without finishing: poison",
                    record.task_id,
                    record.type,
                    record.starts,
                )
                self._send(Control(Command.POISON, record.task_id, f"{record.starts}"))

    async def _is_cancelled(self, task_id: str) -> bool:
        record = await self.store.get(task_id)
        return record is not None and record.state is TaskState.CANCELLED

    def _send(self, control: Control) -> None:
        async def send() -> None:
            body, headers = control.encode()
            try:
                await self.broker.publish(topology.CONTROL_EXCHANGE, "", body, headers)
            except BrokerUnavailable as exc:
                log.warning("task %s: cannot tell workers %s: %s", control.subject, control.command.value, exc)

        self._background.spawn(send())


def _new_callback(record: TaskRecord) -> bool:
    """A group callback the store made in this batch (stored unconfirmed, still to publish)."""
    return bool(record.group_id) and record.group_index < 0 and record.state is TaskState.QUEUED and not record.attempts
