"""The worker supervisor: RabbitMQ deliveries in, task events out, a process pool between.

    RabbitMQ work queue(s) ──deliveries (prefetch, manual ack)──► Supervisor._handle
                                                                      │ decode TaskMessage
                                                                      ▼
                          publish RUNNING event ◄── on_started ── Pool.run(job)
                                                                      │ Outcome
                                                                      ▼
    qm.events exchange ◄── publish terminal event (await confirm) ── then ack delivery

A delivery is acked only after its outcome event is confirmed by the broker, so a crash
anywhere before that means RabbitMQ redelivers the task (at-least-once). Everything runs
on one asyncio loop that never waits on task work, so AMQP heartbeats keep flowing
however long tasks take.
"""
from __future__ import annotations

import asyncio
import logging

from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import BrokerUnavailable
from qm.messages import TaskEvent, TaskMessage
from qm.states import TaskState
from qm.worker.pool import Job, Outcome, Pool

log = logging.getLogger(__name__)

#: Longest wait for the broker to come back before retrying an event publish.
EVENT_RETRY_WAIT_S = 5.0


class Supervisor:
    """Consumes tasks, runs them on the pool, reports outcomes, acks."""

    def __init__(self, broker: Broker, pool: Pool, worker_id: str, queues: list[str], prefetch: int,
                 queue_type: str = "classic") -> None:
        self.broker = broker
        self.pool = pool
        self.worker_id = worker_id
        self.queues = queues
        self.prefetch = prefetch
        self.queue_type = queue_type
        self._consumer_tags: list[str] = []
        self._waiting: set[asyncio.Task] = set()   # handlers whose job has not started
        self._handlers: set[asyncio.Task] = set()  # every handler in flight
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.broker.declare_exchange(topology.EVENTS_EXCHANGE, "fanout")
        for queue in self.queues:
            name = await topology.declare_work_queue(self.broker, queue, self.queue_type)
            self._consumer_tags.append(await self.broker.consume(name, self._on_delivery, self.prefetch))
        log.info("worker %s consuming %s with prefetch %d per queue, %d children",
                 self.worker_id, ", ".join(self.queues), self.prefetch, self.pool.procs)

    def _on_delivery(self, delivery: Delivery) -> None:
        handler = asyncio.create_task(self._handle(delivery))
        self._handlers.add(handler)
        self._waiting.add(handler)
        handler.add_done_callback(self._handlers.discard)
        handler.add_done_callback(self._waiting.discard)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            message = TaskMessage.decode(delivery.body)
        except ValueError as exc:
            log.error("rejecting an undecodable task message (headers %s): %s", delivery.headers, exc)
            self.broker.nack(delivery, requeue=False)
            return
        handler = asyncio.current_task()
        job = Job(message.task_id, message.type, message.payload)

        def on_started() -> None:
            self._waiting.discard(handler)
            self._spawn(self._publish_event(self._event(message, TaskState.RUNNING)))

        try:
            outcome = await self.pool.run(job, on_started)
        except asyncio.CancelledError:
            if handler not in self._waiting:
                raise
            self.broker.nack(delivery, requeue=True)  # never started: back to the queue
            raise
        log.info("task %s (%s) attempt %d: %s", message.task_id, message.type, message.attempt,
                 outcome.state.name)
        await self._publish_event(self._event(message, outcome.state, outcome))
        self.broker.ack(delivery)

    def _event(self, message: TaskMessage, state: TaskState, outcome: Outcome | None = None) -> TaskEvent:
        return TaskEvent(message.task_id, message.type, message.queue, message.attempt, state,
                         self.worker_id, outcome.result if outcome else b"", outcome.error if outcome else "")

    async def _publish_event(self, event: TaskEvent) -> None:
        """Publish until confirmed: the outcome is the task's value, worth waiting for."""
        headers = {"qm-task-id": event.task_id, "qm-state": event.state.name}
        while True:
            try:
                await self.broker.publish(topology.EVENTS_EXCHANGE, "", event.encode(), headers)
                return
            except BrokerUnavailable as exc:
                log.warning("task %s: cannot report %s yet (%s); retrying", event.task_id,
                            event.state.name, exc)
                await self.broker.wait_connected(EVENT_RETRY_WAIT_S)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop consuming; return unstarted deliveries; let running tasks finish (bounded)."""
        for tag in self._consumer_tags:
            try:
                await self.broker.cancel(tag)
            except BrokerUnavailable:
                pass  # disconnected: RabbitMQ requeues everything unacked anyway
        for handler in list(self._waiting):
            handler.cancel()
        if self._handlers:
            log.info("waiting for %d running task(s) to finish", len(self._handlers))
            await asyncio.wait(set(self._handlers), timeout=drain_timeout_s)
        if self._background:
            await asyncio.wait(set(self._background), timeout=EVENT_RETRY_WAIT_S)

    @property
    def busy(self) -> int:
        return len(self._handlers) - len(self._waiting)
