"""The worker supervisor: RabbitMQ deliveries in, task events out, a process pool between.

    RabbitMQ work queue(s) ──deliveries (prefetch, manual ack)──► Supervisor._handle
                                                                      │ decode TaskMessage,
                                                                      │ cap its limits
                                                                      ▼
                          publish RUNNING event ◄── on_started ── Pool.run(job)
                                                                      │ Outcome (the pool's
                                                                      │ deadline and RSS
                                                                      ▼ watchdogs kill)
    qm.events exchange ◄── publish outcome event (await confirm) ── then ack delivery
                                                  └──► prefetch.observe(run time) → set_prefetch

A redelivered delivery (its last holder may have died of it) passes the Isolation gate
first: it runs alone, its RUNNING confirmed before it starts, so the servers can count the
starts of a task that kills workers. A delivery is acked only after its outcome event is
confirmed by the broker, so a crash
anywhere before that means RabbitMQ redelivers the task (at-least-once). Everything runs
on one asyncio loop that never waits on task work, so AMQP heartbeats keep flowing
however long tasks take.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import socket
import time
import uuid

import qm
from qm import limits as task_limits
from qm import retry
from qm.broker import topology
from qm.broker.base import Broker, Delivery
from qm.errors import BrokerUnavailable
from qm.messages import Heartbeat, TaskEvent, TaskMessage
from qm.metrics import WorkerMetrics
from qm.states import TaskState
from qm.worker.isolation import Isolation
from qm.worker.pool import Job, Outcome, Pool
from qm.worker.prefetch import AutoPrefetch, FixedPrefetch

log = logging.getLogger(__name__)

#: Longest wait for the broker to come back before retrying an event publish.
EVENT_RETRY_WAIT_S = 5.0
#: Outcomes that mean the child was killed or lost, and their `reason` label.
KILL_REASONS = {TaskState.TIMED_OUT: "timeout", TaskState.MEMORY_EXCEEDED: "memory",
                TaskState.CRASHED: "crash", TaskState.CANCELLED: "cancel"}
#: Run time after which a running task counts as long for the prefetch, before it ends.
LONG_TASK_S = 1.0
#: Longest wait to read the cancel stream up to now before taking tasks anyway.
CANCEL_CATCH_UP_TIMEOUT_S = 30.0
#: Unacked messages from the cancel stream the worker may hold (streams need a prefetch).
CONTROL_PREFETCH = 1000
#: How many cancelled task ids a worker remembers (to drop them if they arrive later).
CANCELLED_MEMORY = 100_000


class Supervisor:
    """Consumes tasks, runs them on the pool, reports outcomes, acks."""

    def __init__(self, broker: Broker, pool: Pool, worker_id: str, queues: list[str],
                 prefetch: AutoPrefetch | FixedPrefetch | int, queue_type: str = "quorum", *,
                 caps: task_limits.Limits = task_limits.Limits(0.0, 0), soft_timeout_grace_s: float = 1.0,
                 delivery_limit: int = 5, metrics: WorkerMetrics | None = None) -> None:
        self.broker = broker
        self.pool = pool
        self.worker_id = worker_id
        self.queues = queues
        self.prefetch = FixedPrefetch(prefetch) if isinstance(prefetch, int) else prefetch
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.metrics = metrics or WorkerMetrics()
        self.caps = caps
        self.soft_timeout_grace_s = soft_timeout_grace_s
        self.draining = False
        self._consumer_tags: list[str] = []
        self._control_tag = ""
        self._marker = f"{worker_id}:{uuid.uuid4()}"  # read back from the cancel stream = caught up
        self._caught_up = asyncio.Event()
        self._poison: dict[str, str] = {}  # task id → starts counted, from the servers
        self._isolation = Isolation()
        self._unsettled: dict[asyncio.Task, Delivery] = {}  # handler → its delivery, until settled
        self._waiting: set[asyncio.Task] = set()              # handlers whose job has not started
        self._background: set[asyncio.Task] = set()
        self._delay_tiers: set[int] = set()
        self._by_task: dict[str, asyncio.Task] = {}              # task id → its handler
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def start(self) -> None:
        await self.broker.declare_exchange(topology.EVENTS_EXCHANGE, "fanout")
        await self.broker.declare_exchange(topology.HEARTBEATS_EXCHANGE, "fanout")
        await self._read_cancels()
        for queue in self.queues:
            name = await topology.declare_work_queue(self.broker, queue, self.queue_type, self.delivery_limit)
            self._consumer_tags.append(await self.broker.consume(name, self._on_delivery, self.prefetch.value))
        log.info("worker %s consuming %s with prefetch %d per queue (%s), %d children",
                 self.worker_id, ", ".join(self.queues), self.prefetch.value,
                 "auto" if isinstance(self.prefetch, AutoPrefetch) else "fixed", self.pool.procs)

    async def _read_cancels(self) -> None:
        """Follow the cancel stream, and catch up with it before taking any task: publish a
        marker into it and wait to read it back, so every earlier cancel is known."""
        cancels = await topology.declare_cancel_stream(self.broker)
        self._control_tag = await self.broker.consume(cancels, self._on_control, CONTROL_PREFETCH,
                                                      topology.FROM_STREAM_START)
        await self.broker.publish(topology.CONTROL_EXCHANGE, "", self._marker.encode(), {"qm-command": "marker"})
        try:
            await asyncio.wait_for(self._caught_up.wait(), CANCEL_CATCH_UP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("cancel stream not read to its end within %g s; starting anyway", CANCEL_CATCH_UP_TIMEOUT_S)

    def _on_control(self, delivery: Delivery) -> None:
        """A cancel: drop the task if it waits here, kill it if it runs here, remember it."""
        self.broker.ack(delivery)
        command, body = delivery.headers.get("qm-command"), delivery.body.decode(errors="replace")
        if command == "marker" and body == self._marker:
            self._caught_up.set()
        if command == "poison":
            self._poison[body] = str(delivery.headers.get("qm-detail", ""))
            return
        if command != "cancel":
            return
        task_id = body
        self._cancelled[task_id] = None
        while len(self._cancelled) > CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)
        handler = self._by_task.get(task_id)
        if handler is None:
            return
        if handler in self._waiting:
            log.info("task %s cancelled before it started", task_id)
            self._settle(handler, ack=True)
            handler.cancel()
            return
        for slot in self.pool.slots:
            if slot.job is not None and slot.job.task_id == task_id:
                log.info("task %s cancelled while running: killing child %d", task_id, slot.index)
                slot.kill(Outcome(TaskState.CANCELLED, error="cancelled by request while running"))

    def _on_delivery(self, delivery: Delivery) -> None:
        handler = asyncio.create_task(self._handle(delivery))
        self._unsettled[handler] = delivery
        self._waiting.add(handler)
        handler.add_done_callback(self._waiting.discard)
        handler.add_done_callback(self._on_handler_done)

    def _on_handler_done(self, handler: asyncio.Task) -> None:
        if not handler.cancelled() and handler.exception() is not None:
            log.error("task handler failed; the delivery returns to the queue",
                      exc_info=handler.exception())
        self._settle(handler, ack=False)  # no-op when the handler settled it
    def _settle(self, handler: asyncio.Task, ack: bool) -> None:
        delivery = self._unsettled.pop(handler, None)
        if delivery is not None:
            self.broker.ack(delivery) if ack else self.broker.nack(delivery, requeue=True)

    def job_for(self, message: TaskMessage) -> Job:
        """The job with the smallest limits that apply (the task's, then this worker's caps)."""
        limits = task_limits.cap(task_limits.Limits(message.timeout_s, message.memory_limit_mb),
                                 self.caps.timeout_s, self.caps.memory_limit_mb)
        soft = task_limits.soft_timeout_s(limits.timeout_s, self.soft_timeout_grace_s)
        return Job(message.task_id, message.type, message.payload, limits.timeout_s,
                   limits.memory_limit_mb, soft)

    async def _handle(self, delivery: Delivery) -> None:
        handler = asyncio.current_task()
        try:
            message = TaskMessage.decode(delivery.body)
        except ValueError as exc:
            log.error("rejecting an undecodable task message (headers %s): %s", delivery.headers, exc)
            self._unsettled.pop(handler, None)
            self.broker.nack(delivery, requeue=False)
            return
        if message.task_id in self._cancelled:
            log.info("task %s was cancelled; dropping it", message.task_id)
            self._settle(handler, ack=True)
            return
        if message.task_id in self._poison:
            await self._dead_letter_poison(message, self._poison[message.task_id])
            self._settle(handler, ack=True)
            return
        self._by_task[message.task_id] = handler
        handler.add_done_callback(lambda _: self._by_task.pop(message.task_id, None))
        job = self.job_for(message)
        started_at = 0.0
        # A redelivered task may be what took its last worker down: it runs alone, and its
        # start is on record (confirmed) before it runs, so the servers can count it.
        suspect = delivery.redelivered

        def on_started() -> None:
            nonlocal started_at
            started_at = time.monotonic()
            self.metrics.queue_wait_seconds.labels(message.type).observe(max(0.0, time.time() - message.enqueued_at_s))
            self._waiting.discard(handler)
            # A task still running at this point already tells the prefetch it is long,
            # before it finishes (which may be much later).
            still_running = asyncio.get_running_loop().call_later(
                LONG_TASK_S, lambda: self._observe(time.monotonic() - started_at))
            handler.add_done_callback(lambda _: still_running.cancel())
            if not suspect:
                self._spawn(self._publish_event(self._event(message, TaskState.RUNNING, job=job)))

        try:
            await self._isolation.enter(suspect)
            try:
                if suspect:
                    await self._publish_event(self._event(message, TaskState.RUNNING, job=job))
                outcome = await self.pool.run(job, on_started)
            finally:
                self._isolation.leave(suspect)
        except asyncio.CancelledError:
            self._settle(handler, ack=False)  # back to the queue: another worker runs it
            raise
        log.info("task %s (%s) attempt %d: %s%s", message.task_id, message.type, message.attempt,
                 outcome.state.name, f": {outcome.error.splitlines()[0]}" if outcome.error else "")
        run_s = time.monotonic() - started_at
        self._observe(run_s)
        self.metrics.run_seconds.labels(message.type).observe(run_s)
        if outcome.state in KILL_REASONS:
            self.metrics.kills.labels(KILL_REASONS[outcome.state]).inc()
        await self._report(message, outcome)
        self._settle(handler, ack=True)

    async def _report(self, message: TaskMessage, outcome: Outcome) -> None:
        """Publish what follows an attempt, each confirmed before the delivery is acked:
        a retry (next attempt into a delay tier, then RETRYING) or the final state (a dead
        letter unless it succeeded, then the terminal event)."""
        if outcome.state in (TaskState.SUCCEEDED, TaskState.CANCELLED):
            await self._publish_event(self._event(message, outcome.state, outcome))
            self.metrics.tasks_finished.labels(message.type, outcome.state.name).inc()
            return
        policy = message.retry
        if not outcome.permanent and policy.retries(outcome.state, message.attempt):
            requested = outcome.retry_delay_s if outcome.retry_requested else None
            tier_s = retry.tier_for(policy.delay_s(message.attempt) if requested is None else requested)
            await self._ensure_delay_tier(tier_s)
            following = dataclasses.replace(message, attempt=message.attempt + 1, enqueued_at_s=time.time())
            await self._publish_confirmed(topology.delay_tier_name(tier_s), message.queue,
                                          following.encode(), following.headers(), message.task_id)
            event = self._event(message, TaskState.RETRYING, outcome)
            await self._publish_event(dataclasses.replace(event, next_attempt_at_s=time.time() + tier_s))
            self.metrics.tasks_finished.labels(message.type, TaskState.RETRYING.name).inc()
            return
        headers = {**message.headers(), topology.DEAD_REASON_HEADER: dead_reason(message, outcome),
                   "qm-state": outcome.state.name, "qm-error": outcome.error[:2000]}
        await self._publish_confirmed(topology.DEAD_EXCHANGE, "", message.encode(), headers, message.task_id)
        await self._publish_event(self._event(message, outcome.state, outcome))
        self.metrics.tasks_finished.labels(message.type, outcome.state.name).inc()

    async def _dead_letter_poison(self, message: TaskMessage, starts: str) -> None:
        """The servers saw this task start `starts` times without an outcome: each time it
        took its worker down. End it CRASHED in the dead letters instead of running it."""
        reason = (f"started {starts} times and each time its worker died before it finished "
                  "(broker.delivery_limit)")
        error = (f"task {message.task_id} dead-lettered: it took its whole worker down on every run, "
                 f"{reason}. A task that kills workers, not just a child, ends here instead of looping")
        log.warning("task %s (%s) is poison: %s", message.task_id, message.type, reason)
        headers = {**message.headers(), topology.DEAD_REASON_HEADER: reason, "qm-state": TaskState.CRASHED.name,
                   "qm-error": error}
        await self._publish_confirmed(topology.DEAD_EXCHANGE, "", message.encode(), headers, message.task_id)
        await self._publish_event(self._event(message, TaskState.CRASHED, Outcome(TaskState.CRASHED, error=error)))
        self.metrics.tasks_finished.labels(message.type, TaskState.CRASHED.name).inc()

    async def _ensure_delay_tier(self, tier_s: int) -> None:
        if tier_s not in self._delay_tiers:
            await topology.declare_delay_tier(self.broker, tier_s)
            self._delay_tiers.add(tier_s)

    def _observe(self, duration_s: float) -> None:
        previous = self.prefetch.value
        new_prefetch = self.prefetch.observe(duration_s)
        if new_prefetch is None or self.draining:
            return
        log.info("prefetch now %d per queue (mean task time %.3f s)", new_prefetch, self.prefetch.mean_s)
        for tag in self._consumer_tags:
            self._spawn(self._set_prefetch(tag, new_prefetch))
        if new_prefetch < previous:
            self._release_excess(new_prefetch)

    def _release_excess(self, prefetch: int) -> None:
        """Tasks turned long: return deliveries buffered beyond the new prefetch, so an idle
        worker can take them now. Each delivery is returned this way at most once (a
        redelivered one stays): on a quorum queue every return counts toward its delivery
        limit."""
        room = max(0, prefetch * len(self.queues) - self.busy)
        waiting = [handler for handler in self._unsettled if handler in self._waiting]
        for handler in waiting[room:]:
            if not self._unsettled[handler].redelivered:
                self._settle(handler, ack=False)
                handler.cancel()

    async def _set_prefetch(self, tag: str, prefetch: int) -> None:
        try:
            await self.broker.set_prefetch(tag, prefetch)
        except BrokerUnavailable as exc:
            log.warning("prefetch change to %d deferred: %s", prefetch, exc)

    def _event(self, message: TaskMessage, state: TaskState, outcome: Outcome | None = None,
               job: Job | None = None) -> TaskEvent:
        return TaskEvent(message.task_id, message.type, message.queue, message.attempt, state,
                         self.worker_id, outcome.result if outcome else b"", outcome.error if outcome else "",
                         timeout_s=job.timeout_s if job else 0.0,
                         memory_limit_mb=job.memory_limit_mb if job else 0)

    async def _publish_event(self, event: TaskEvent) -> None:
        headers = {"qm-task-id": event.task_id, "qm-state": event.state.name}
        await self._publish_confirmed(topology.EVENTS_EXCHANGE, "", event.encode(), headers, event.task_id)

    async def _publish_confirmed(self, exchange: str, routing_key: str, body: bytes, headers: dict,
                                 task_id: str) -> None:
        """Publish until confirmed: an outcome is the task's value, worth waiting for."""
        while True:
            try:
                await self.broker.publish(exchange, routing_key, body, headers)
                return
            except BrokerUnavailable as exc:
                log.warning("task %s: cannot publish to %s yet (%s); retrying", task_id, exchange, exc)
                await self.broker.wait_connected(EVENT_RETRY_WAIT_S)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain: stop consuming, return unstarted deliveries, let running tasks finish up
        to `drain_timeout_s`, then kill the rest and return them to the queue too."""
        self.draining = True
        for tag in [*self._consumer_tags, self._control_tag]:
            try:
                await self.broker.cancel(tag)
            except BrokerUnavailable:
                pass  # disconnected: RabbitMQ requeues everything unacked anyway
        for handler in list(self._waiting):
            self._settle(handler, ack=False)
            handler.cancel()
        running = [handler for handler in self._unsettled if not handler.done()]
        if running:
            log.info("draining: waiting up to %s s for %d running task(s)",
                     "unbounded" if drain_timeout_s is None else f"{drain_timeout_s:g}", len(running))
            _done, late = await asyncio.wait(running, timeout=drain_timeout_s)
            if late:
                log.warning("drain timeout: killing %d running task(s); they return to the queue", len(late))
                for handler in late:
                    handler.cancel()
                await asyncio.wait(late)
        if self._background:
            await asyncio.wait(set(self._background), timeout=EVENT_RETRY_WAIT_S)

    async def send_heartbeats(self, interval_s: float, types: list[str]) -> None:
        """Announce this worker to the servers every `interval_s` until cancelled."""
        while True:
            await self.send_heartbeat(types)
            await asyncio.sleep(interval_s)

    async def send_heartbeat(self, types: list[str], stopped: bool = False) -> None:
        beat = Heartbeat(self.worker_id, socket.gethostname(), os.getpid(), self.pool.procs, self.busy,
                         tuple(self.queues), tuple(types), qm.__version__, self.draining, stopped)
        try:
            await self.broker.publish(topology.HEARTBEATS_EXCHANGE, "", beat.encode(), {"qm-worker": self.worker_id})
        except BrokerUnavailable:
            pass  # the next one, once reconnected, says the same

    async def abort(self) -> None:
        """Second signal: kill every running task and return all deliveries to the queue now."""
        self.draining = True
        handlers = [handler for handler in self._unsettled if not handler.done()]
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers)

    @property
    def busy(self) -> int:
        return len(self._unsettled) - len(self._waiting)

    @property
    def unacked(self) -> int:
        return len(self._unsettled)


def dead_reason(message: TaskMessage, outcome: Outcome) -> str:
    """Why a task that did not succeed is not tried again, for the dead-letter list."""
    if outcome.permanent:
        return "the task raised qm.PermanentError"
    policy = message.retry
    if policy.covers(outcome.state):
        return f"gave up after {message.attempt} attempt(s) (max_retries={policy.max_retries})"
    if outcome.state is TaskState.TIMED_OUT:
        return "TIMED_OUT is not retried unless retry_on_timeout is set"
    return f"{outcome.state.name} is not retried"

