"""Periodic schedules in the server: add, list, remove, and the tick loop that fires them.

    AddSchedule ──► store.schedules (next_fire_at, indexed)
                         │ every server's tick loop: due_schedules(now) ─► decide (qm/schedules.py)
                         ▼
    claim_tick: compare-and-set next_fire_at  +  the task's rows (insert_unconfirmed)   ← one transaction
                         │ won: publish, await the confirm (TaskService.enqueue); lost: another server fired it
                         ▼
                  the task, as SubmitTask makes it, with schedule_id and the key schedule:<id>:<tick>

Exactly once per tick with several servers on one store: the tick is claimed by a
compare-and-set of the schedule's `next_fire_at` in the transaction that stores the task,
so one server wins and the others store nothing; the task's idempotency key
`schedule:<id>:<tick ISO 8601>` is unique in the store too (a second line of defence). A
crash after that commit and before RabbitMQ's confirm leaves the task unconfirmed: the
loop (or, after a restart, the server's start-up) publishes it again: at least once,
never a second task. A publish refused after the commit is tried again by the loop.

The loop wakes at the earliest next tick (one indexed look-up, whatever the number of
schedules or tasks), at most POLL_S apart (schedules other servers added), or at once when
a schedule is added here.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from qm import priority as priorities
from qm import schedules
from qm.errors import (
    BrokerUnavailable,
    IdempotencyKeyTaken,
    QMError,
    ScheduleNotFound,
    StoreUnavailable,
    ValidationError,
)
from qm.server import idempotency
from qm.server.store_api import ScheduleRecord
from qm.server.submission import Submission

if TYPE_CHECKING:  # the service composes the scheduler: no import at run time
    from qm.server.service import TaskService

log = logging.getLogger(__name__)

#: Longest sleep of the tick loop: a schedule added through another server is seen this late at most.
POLL_S = 1.0
#: Schedules fired per look-up (the loop looks again at once while it finds this many).
DUE_BATCH = 100
#: Pause after the store or RabbitMQ failed the loop.
RETRY_S = 1.0
#: Default and largest page of ListSchedules.
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
#: Default of server.max_schedules.
DEFAULT_MAX_SCHEDULES = 1000
#: The idempotency keys of fired tasks start with it; a client's submit may not use it.
SCHEDULE_KEY_PREFIX = "schedule:"


def tick_key(schedule_id: str, tick_s: float) -> str:
    """The idempotency key of the task a tick fires: one task per tick, whoever fires it."""
    when = datetime.datetime.fromtimestamp(tick_s, datetime.timezone.utc)
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:{when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}"


def submission_of(schedule: ScheduleRecord) -> Submission:
    options: dict[str, Any] = json.loads(schedule.options_json)
    return Submission(schedule.type, schedule.payload, schedule.queue, **options)


def when_of(schedule: ScheduleRecord) -> schedules.When:
    return schedules.When(schedule.cron, schedule.every_s, schedule.timezone)


class Scheduler:
    """The schedules of one server's store (TaskService composes it; see the module docstring)."""

    def __init__(
        self,
        service: TaskService,
        grace_s: float = schedules.DEFAULT_GRACE_S,
        max_schedules: int = DEFAULT_MAX_SCHEDULES,
    ):
        self.service = service  # its store, metrics and submit path (prepare, enqueue)
        self.store = service.store
        self.metrics = service.metrics
        self.grace_s = grace_s
        self.max_schedules = max_schedules
        self._wake = asyncio.Event()
        self._unpublished: list[str] = []  # fired tasks whose publish failed after their commit
        self._broker_warned = False

    # -- the API -----------------------------------------------------------------------

    async def add(
        self, schedule_id: str, when: schedules.When, missed: str, task: Submission, now_s: float | None = None
    ) -> ScheduleRecord:
        """Validate and store a schedule (its task exactly as a submit would be checked);
        the same id with the same definition again returns the stored one."""
        schedules.check_schedule_id(schedule_id)
        when = when.check()
        missed = schedules.check_missed(missed)
        if task.idempotency_key or task.delay_s is not None or task.not_before_s is not None:
            raise ValidationError(
                "task", "idempotency_key, delay_s and not_before must be unset: each tick sets its own key"
            )
        now = time.time() if now_s is None else now_s
        await self._check_task(schedule_id, task, now)
        options = {
            "timeout_s": task.timeout_s,
            "memory_limit_mb": task.memory_limit_mb,
            "soft_timeout_s": task.soft_timeout_s,
            "retry_options": {name: value for name, value in task.retry_options.items() if value is not None},
        }
        if task.priority is not None:  # absent otherwise: definitions from before priorities stay equal
            options["priority"] = priorities.resolve(task.priority, None)
        if task.cpus:  # absent otherwise, as priority
            options["cpus"] = task.cpus
        record = ScheduleRecord(
            schedule_id,
            when.cron,
            when.every_s,
            when.timezone,
            missed,
            task.type,
            task.queue or "default",
            task.payload,
            json.dumps(options, sort_keys=True),
            now,
            when.next_after(now),
        )
        existing = await self.store.get_schedule(schedule_id)
        if existing is None and await self.store.count_schedules() >= self.max_schedules:
            raise ValidationError(
                "schedule_id",
                f"this store holds {self.max_schedules} schedules (server.max_schedules); remove one first",
            )
        stored = existing or await self.store.add_schedule(record)
        if _definition(stored) != _definition(record):
            raise ValidationError(
                "schedule_id",
                f"{schedule_id!r} is taken by another schedule ({when_of(stored).describe()}, type {stored.type}); "
                "remove it first or choose another id",
            )
        if stored is not existing:
            log.info("schedule %s added: %s, type %s, missed ticks %s", schedule_id, when.describe(), task.type, missed)
        self._wake.set()
        return stored

    async def _check_task(self, schedule_id: str, task: Submission, now_s: float) -> None:
        """The schedule's task as a submit would be validated, nothing stored or sent; a broker
        away does not stop the schedule from being added."""
        try:
            await self._prepare(schedule_id, task, now_s, now_s)
        except BrokerUnavailable:
            pass

    async def list(self, page_token: str, limit: int) -> tuple[list[ScheduleRecord], str]:
        """A page of schedules by id and the token of the next page ("" after the last)."""
        limit = min(limit or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
        page = await self.store.list_schedules(page_token, limit + 1)
        return page[:limit], page[limit - 1].schedule_id if len(page) > limit else ""

    async def remove(self, schedule_id: str) -> ScheduleRecord:
        stored = await self.store.remove_schedule(schedule_id)
        if stored is None:
            raise ScheduleNotFound(schedule_id)
        log.info("schedule %s removed after %d task(s) fired", schedule_id, stored.fires)
        return stored

    # -- the tick loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Fire due schedules until cancelled: per wake-up one point read of the earliest
        next tick, and the due schedules only when one is due."""
        while True:
            try:
                await self._publish_left_over()
                wait_s = await self._fire_if_due()
            except StoreUnavailable as exc:
                log.warning("schedules: cannot fire ticks yet: %s", exc)
                wait_s = RETRY_S
            except BrokerUnavailable:
                self._warn_broker()
                wait_s = RETRY_S
            except Exception:  # a bug must not stop every schedule of this server for good
                log.exception("schedules: the tick loop failed; it goes on in %g s", RETRY_S)
                wait_s = RETRY_S
            self._wake.clear()
            if wait_s > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass

    async def _fire_if_due(self) -> float:
        """Fire what is due; how long to sleep before looking again."""
        next_at = await self.store.next_schedule_at()
        now = time.time()
        if next_at is None:
            return POLL_S
        if next_at > now:
            return min(POLL_S, next_at - now)
        await self.fire_due(now)
        return 0.0  # look again at once: more may be due (a full batch), else sleep to the next tick

    async def fire_due(self, now_s: float | None = None) -> bool:
        """Fire every schedule due now (a batch of DUE_BATCH at once); False if there may be more due."""
        now = time.time() if now_s is None else now_s
        due = await self.store.due_schedules(now, DUE_BATCH)
        # Concurrently, as submit_many does: their inserts share store transactions and their
        # publishes share RabbitMQ's confirms, so the last of many due at one tick is not
        # late by all the others' round trips.
        outcomes = await asyncio.gather(*(self.fire(schedule, now) for schedule in due), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(due) < DUE_BATCH

    async def fire(self, schedule: ScheduleRecord, now_s: float) -> str | None:
        """Fire the tick of `schedule` due now under its missed-ticks policy; the task id,
        or None if no task fired (another server claimed the tick, the policy skipped it,
        or the task was refused: counted and kept in the schedule's last_error)."""
        decision = schedules.decide(when_of(schedule), schedule.next_fire_at, now_s, schedule.missed, self.grace_s)
        if decision.fire_s is None:
            if await self._advance(schedule, decision, decision.missed):
                self.metrics.schedule_ticks_missed.labels(schedule.missed).inc(decision.missed)
                log.warning(
                    "schedule %s: %d tick(s) missed since %s, none fired (missed ticks: skip, more than %g s late)",
                    schedule.schedule_id,
                    decision.missed,
                    _iso(schedule.next_fire_at),
                    self.grace_s,
                )
            return None
        try:
            record, message = await self._prepare(schedule.schedule_id, submission_of(schedule), decision.fire_s, now_s)
        except (BrokerUnavailable, StoreUnavailable):
            raise  # the tick stays due: fired when they are back (under the missed-ticks policy)
        except QMError as exc:  # the task would be refused now (type gone, a cap lowered, ...)
            if await self._advance(schedule, decision, decision.missed + 1, error=str(exc)):
                self.metrics.schedule_fires.labels(schedule.type, "refused").inc()
                log.error("schedule %s: tick %s fired nothing: %s", schedule.schedule_id, _iso(decision.fire_s), exc)
            return None
        self._broker_warned = False

        async def claim(body: bytes) -> bool:
            fired = (record, message.queue, body)
            return await self.store.claim_tick(
                schedule.schedule_id, schedule.next_fire_at, decision.next_s, fired,
                tick_s=decision.fire_s, missed=decision.missed,
            )  # fmt: skip

        try:
            if not await self.service.enqueue(record, message, claim):
                return None  # another server fired this tick
        except IdempotencyKeyTaken:  # this tick's task exists: fired before; move on
            await self._advance(schedule, decision, decision.missed)
            return None
        except BrokerUnavailable as exc:  # stored with the tick: published again by the loop
            log.warning("schedule %s: task %s stored, its publish waits: %s", schedule.schedule_id, record.task_id, exc)
            self._unpublished.append(record.task_id)
        self._count_fire(schedule, decision, record.task_id, now_s)
        return record.task_id

    async def _prepare(self, schedule_id: str, task: Submission, tick_s: float, now_s: float):
        """The tick's task as a submit makes it (record, message), with its key and digest."""
        return await self.service.prepare_item(
            task,
            idempotency_key=tick_key(schedule_id, tick_s),
            request_digest=idempotency.submission_digest(task),
            schedule_id=schedule_id,
            now_s=now_s,
        )

    async def _advance(
        self, schedule: ScheduleRecord, decision: schedules.Decision, missed: int, error: str = ""
    ) -> bool:
        return await self.store.claim_tick(
            schedule.schedule_id, schedule.next_fire_at, decision.next_s, None, missed=missed, error=error
        )

    def _count_fire(self, schedule: ScheduleRecord, decision: schedules.Decision, task_id: str, now_s: float) -> None:
        assert decision.fire_s is not None
        self.metrics.schedule_fires.labels(schedule.type, "fired").inc()
        self.metrics.schedule_fire_lateness_seconds.observe(max(0.0, now_s - decision.fire_s))
        if decision.missed:
            self.metrics.schedule_ticks_missed.labels(schedule.missed).inc(decision.missed)
            log.warning(
                "schedule %s: %d tick(s) missed since %s; fired once for the latest, %s (missed ticks: coalesce)",
                schedule.schedule_id,
                decision.missed,
                _iso(schedule.next_fire_at),
                _iso(decision.fire_s),
            )
        log.info("schedule %s: tick %s fired task %s", schedule.schedule_id, _iso(decision.fire_s), task_id)

    async def _publish_left_over(self) -> None:
        """Fired tasks whose publish failed after their commit: publish them again."""
        while self._unpublished:
            await self.service.publish_unconfirmed(self._unpublished[0])
            self._unpublished.pop(0)

    def _warn_broker(self) -> None:
        if not self._broker_warned:
            log.warning("schedules: RabbitMQ unavailable; due ticks fire when it is back (missed-ticks policy)")
            self._broker_warned = True


def _definition(schedule: ScheduleRecord) -> tuple:
    """What makes two adds of one id the same schedule."""
    return (
        schedule.cron,
        schedule.every_s,
        schedule.timezone,
        schedule.missed,
        schedule.type,
        schedule.queue,
        schedule.payload,
        schedule.options_json,
    )


def _iso(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat(timespec="milliseconds")
