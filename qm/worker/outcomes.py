"""What follows an attempt, published before its delivery is acked (at-least-once).

    outcome ──► SUCCEEDED / CANCELLED ────────────────────────► event ─┐
            ──► retried: next attempt → qm.delay.<tier> ──────► RETRYING event ─┤ each publish
            ──► final: task message → qm.dead (with why) ─────► final event ─┤ confirmed,
                                                                             ▼ then
                                                                       ack(delivery)

A crash anywhere before the ack makes RabbitMQ redeliver the task: it runs again (attempts
are idempotent; the servers order events with qm.states.supersedes). A publish that
fails because RabbitMQ is away is retried until it is confirmed: an outcome is the task's
value, worth waiting for. Events handed over together, or behind another event's confirm,
go out packed in one message (qm/worker/event_packs.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from qm import retry
from qm.broker import topology
from qm.broker.base import Broker, publish_until_confirmed
from qm.messages import TaskEvent, TaskMessage
from qm.metrics import WorkerMetrics
from qm.protocol import dead_letter_headers
from qm.states import TaskState
from qm.worker.event_packs import EventPacks
from qm.worker.pool import Job, Outcome

log = logging.getLogger(__name__)


class Outcomes:
    """Publishes events, retries and dead letters for one worker."""

    def __init__(
        self,
        broker: Broker,
        worker_id: str,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
        max_result_bytes: int = 0,
        pack_events: bool = True,
    ) -> None:
        self.broker = broker
        self.clock = clock  # wall clock: due times are compared across hosts
        self.worker_id = worker_id
        self.metrics = metrics
        self.max_result_bytes = max_result_bytes  # worker.max_result_bytes; 0 = no cap
        self._delay_tiers: set[int] = set()
        self.events = EventPacks(broker, enabled=pack_events, on_message=metrics.events_per_message.observe)

    async def settle(
        self,
        message: TaskMessage,
        outcome: Outcome,
        ack: Callable[[], None],
        job: Job | None = None,
        started_at_s: float | None = None,
    ) -> None:
        """Publish what follows the attempt, each confirmed, and only then `ack()`. The
        outcome event carries the job's limits; `started_at_s`: the run started then and no
        RUNNING event said so, and the servers count the start from the outcome."""
        await self._report(message, self._capped(message, outcome), job, started_at_s)
        ack()

    def _capped(self, message: TaskMessage, outcome: Outcome) -> Outcome:
        """A result over worker.max_result_bytes ends the task FAILED, for good (the same
        run would return it again), with an error saying so: it is never published, so it
        can never break a RabbitMQ channel or a gRPC message on its way to the client."""
        size = len(outcome.result)
        if not self.max_result_bytes or size <= self.max_result_bytes:
            return outcome
        log.warning(
            "task %s (%s): result of %d bytes is over worker.max_result_bytes (%d); failing it",
            message.task_id,
            message.type,
            size,
            self.max_result_bytes,
        )
        return Outcome(
            TaskState.FAILED,
            permanent=True,
            error=(
                f"the task's result is {size} bytes, over the limit of {self.max_result_bytes} bytes "
                "(worker.max_result_bytes); return less (e.g. write big outputs to shared storage and return "
                "their location)"
            ),
        )

    async def _report(
        self, message: TaskMessage, outcome: Outcome, job: Job | None = None, started_at_s: float | None = None
    ) -> None:
        if outcome.state in (TaskState.SUCCEEDED, TaskState.CANCELLED):
            await self.publish_event(self.event(message, outcome.state, outcome, job, started_at_s))
            self.metrics.tasks_finished.labels(message.type, outcome.state.name).inc()
            return
        policy = message.retry
        if not outcome.permanent and policy.retries(outcome.state, message.attempt):
            requested = outcome.retry_delay_s if outcome.retry_requested else None
            tier_s = retry.tier_for(policy.delay_s(message.attempt) if requested is None else requested)
            await self.ensure_delay_tier(tier_s)
            following = dataclasses.replace(message, attempt=message.attempt + 1, enqueued_at_s=self.clock())
            await self._publish(
                topology.delay_tier_name(tier_s),
                message.routing_key,  # back to its own work queue (its band's or size's) when the wait ends
                following.encode(),
                following.headers(),
                message.task_id,
            )
            event = self.event(message, TaskState.RETRYING, outcome, job, started_at_s)
            await self.publish_event(dataclasses.replace(event, next_attempt_at_s=self.clock() + tier_s))
            self.metrics.tasks_finished.labels(message.type, TaskState.RETRYING.name).inc()
            return
        await self._dead_letter(message, outcome, dead_reason(message, outcome), job, started_at_s)

    async def dead_letter_poison(self, message: TaskMessage, starts: str, ack: Callable[[], None]) -> None:
        """The servers saw this task start `starts` times without an outcome: each time it
        took its worker down. End it CRASHED in the dead letters instead of running it."""
        reason = f"started {starts} times and each time its worker died before it finished (broker.delivery_limit)"
        error = (
            f"task {message.task_id} dead-lettered: it took its whole worker down on every run, "
            f"{reason}. A task that kills workers, not just a child, ends here instead of looping"
        )
        log.warning("task %s (%s) is poison: %s", message.task_id, message.type, reason)
        await self._dead_letter(message, Outcome(TaskState.CRASHED, error=error), reason)
        ack()

    async def _dead_letter(
        self,
        message: TaskMessage,
        outcome: Outcome,
        reason: str,
        job: Job | None = None,
        started_at_s: float | None = None,
    ) -> None:
        headers = dead_letter_headers(message.headers(), reason, outcome.state.name, outcome.error)
        await self._publish(topology.DEAD_EXCHANGE, "", message.encode(), headers, message.task_id)
        await self.publish_event(self.event(message, outcome.state, outcome, job, started_at_s))
        self.metrics.tasks_finished.labels(message.type, outcome.state.name).inc()

    async def hold(self, message: TaskMessage, tier_s: int, ack: Callable[[], None]) -> None:
        """A delayed task came before its due time (qm/scheduling.py): send it on to the
        delay tier `tier_s` (confirmed), then `ack()`; it never waits in this worker."""
        await self.ensure_delay_tier(tier_s)
        await self._publish(
            topology.delay_tier_name(tier_s), message.routing_key, message.encode(), message.headers(), message.task_id
        )
        log.debug("task %s is due at %s: back to delay tier %d s", message.task_id, message.not_before_s, tier_s)
        self.metrics.delay_hops.labels(str(tier_s)).inc()
        ack()

    async def ensure_delay_tier(self, tier_s: int) -> None:
        if tier_s not in self._delay_tiers:
            await topology.declare_delay_tier(self.broker, tier_s)
            self._delay_tiers.add(tier_s)

    def event(
        self,
        message: TaskMessage,
        state: TaskState,
        outcome: Outcome | None = None,
        job: Job | None = None,
        started_at_s: float | None = None,
        at_s: float | None = None,
    ) -> TaskEvent:
        """The event of `state`, dated `at_s` (default now), with the job's limits if given."""
        return TaskEvent(
            message.task_id,
            message.type,
            message.queue,
            message.attempt,
            state,
            self.worker_id,
            outcome.result if outcome else b"",
            outcome.error if outcome else "",
            time.time() if at_s is None else at_s,
            timeout_s=job.timeout_s if job else 0.0,
            memory_limit_mb=job.memory_limit_mb if job else 0,
            started_at_s=started_at_s,
            run_s=outcome.run_s or 0.0 if outcome else 0.0,
        )

    async def publish_event(self, event: TaskEvent) -> None:
        """Publish `event` (packed with others waiting meanwhile: qm/worker/event_packs.py);
        return once it is confirmed."""
        await self.events.publish(event)

    def hand_over_event(self, event: TaskEvent) -> asyncio.Future[None]:
        """publish_event, taken now: published before any event handed over after this
        call (a start announced in the loop turn its run's outcome is settled in still goes
        first); resolves once confirmed."""
        return self.events.hand_over(event)

    async def _publish(self, exchange: str, routing_key: str, body: bytes, headers: dict, task_id: str) -> None:
        await publish_until_confirmed(self.broker, exchange, routing_key, body, headers, f"task {task_id}")


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
