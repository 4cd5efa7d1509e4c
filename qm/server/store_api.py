"""The store seam: what the server asks of a task store, whatever holds it.

`TaskStore` is the interface; `qm.server.store.Store` (SQLite, one server) implements it,
and so may another store (e.g. PostgreSQL shared by several servers). Every method is a
coroutine: an implementation may run its statements on a thread (SQLite) or over the
network (PostgreSQL), never blocking the event loop for long.

What every implementation promises:
- `insert_unconfirmed` is durable when it returns (a kill -9 after it keeps the task and
  its message); the server publishes only after it.
- `confirm` may be deferred: it is written with a later write (at most a short while
  later), and from the moment it returns `unconfirmed()` leaves that task out. A crash
  before it is written makes the next start publish the message again: at-least-once.
- `apply` is idempotent and order-safe (`qm.states.supersedes`); its changes are durable
  when it returns (the caller acks the events after it). A progress event (one with
  `progress`) goes only through `qm.server.progress.next_progress` (the four progress
  columns, never the state or the start count), and a RUNNING event counted as a start
  clears those columns.
- Groups (qm/server/groups.py): `insert_group` stores a group with its members, each
  unconfirmed as `insert_unconfirmed` would, in one transaction. `apply` counts a
  member's first terminal state in the group row in the same transaction, and the
  transaction that counts the last one (decided by the database: one row update) stores
  the group's callback task as unconfirmed and returns its QUEUED record among the
  changes: the caller publishes it as any unconfirmed task (a crash before is repaired at
  start-up by `unconfirmed()`). So a callback is made exactly once per store.
- Every look-up finds its rows through an index: the cost of a call does not grow with
  the number of tasks stored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Protocol, Sequence

from qm.messages import TaskEvent
from qm.priority import DEFAULT_PRIORITY
from qm.states import TaskState


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """What the server knows of one task (timestamps in seconds since the epoch)."""

    task_id: str
    type: str
    queue: str
    codec: str
    state: TaskState
    attempts: int
    result: bytes | None
    error: str
    worker: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    timeout_s: float = 0.0  # effective hard time limit
    memory_limit_mb: int = 0  # effective memory limit; 0 = none
    idempotency_key: str = ""
    max_retries: int = 0
    next_attempt_at: float | None = None  # while RETRYING; while SCHEDULED: when due
    starts: int = 0  # RUNNING events seen, redelivered ones too (poison detection)
    request_digest: str = ""  # of the request, kept with its idempotency key (qm/server/idempotency.py)
    progress: float = 0.0  # the latest qm.progress() of the current attempt, 0..1 (qm/server/progress.py)
    progress_message: str = ""
    progress_detail_json: str = ""
    progress_at: float | None = None  # when that report was made
    priority: int = DEFAULT_PRIORITY  # 0-9, higher runs first (qm/priority.py)
    cpus: int = 1  # CPU slots it takes on a worker (as resolved at submit)
    schedule_id: str = ""  # the periodic schedule that fired it (qm/server/scheduler.py); "" = submitted
    group_id: str = ""  # the group it is a member or the callback of (qm/server/groups.py)
    group_index: int = -1  # its place among the group's members; -1: the callback, or no group

    @property
    def group_member(self) -> bool:
        return bool(self.group_id) and self.group_index >= 0

    @classmethod
    def queued(
        cls,
        task_id: str,
        type: str,
        queue: str,
        codec: str,
        at_s: float,
        timeout_s: float = 0.0,
        memory_limit_mb: int = 0,
        idempotency_key: str = "",
        max_retries: int = 0,
        request_digest: str = "",
        due_s: float | None = None,
        priority: int = DEFAULT_PRIORITY,
        cpus: int = 1,
        schedule_id: str = "",
    ) -> TaskRecord:
        """A task just accepted (or first heard of), QUEUED at `at_s`; SCHEDULED if due at `due_s`."""
        state = TaskState.QUEUED if due_s is None else TaskState.SCHEDULED
        return cls(
            task_id,
            type,
            queue,
            codec,
            state,
            0,
            None,
            "",
            "",
            at_s,
            None,
            None,
            at_s,
            timeout_s,
            memory_limit_mb,
            idempotency_key,
            max_retries,
            next_attempt_at=due_s,
            request_digest=request_digest,
            priority=priority,
            cpus=cpus,
            schedule_id=schedule_id,
        )


@dataclasses.dataclass(frozen=True)
class GroupRecord:
    """A group of tasks and its callback (qm/server/groups.py); times in epoch seconds."""

    group_id: str
    members: int
    finished: int  # members that reached a terminal state
    created_at: float
    completed_at: float | None  # when the last member finished
    callback_task_id: str  # "" without a callback
    callback_queue: str
    callback_body: bytes  # the callback's TaskMessage as submitted (its payload the caller's)
    idempotency_key: str = ""
    request_digest: str = ""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A task that failed for good, with the message that can run it again."""

    task_id: str
    type: str
    queue: str
    state: TaskState
    attempts: int
    reason: str
    error: str
    body: bytes
    dead_at: float


@dataclasses.dataclass(frozen=True)
class ScheduleRecord:
    """A periodic schedule (qm/schedules.py): when it ticks, the task each tick submits (its
    request fields as JSON, the payload apart), and what it did last (times in epoch seconds)."""

    schedule_id: str
    cron: str  # "" for an every_s schedule
    every_s: float  # 0 for a cron schedule
    timezone: str
    missed: str  # qm.schedules.COALESCE or SKIP
    type: str
    queue: str
    payload: bytes
    options_json: str  # the Submission's other fields (limits, retry options)
    created_at: float
    next_fire_at: float  # the next tick: what the servers' tick loops look for (indexed)
    last_tick_at: float | None = None  # the tick that fired last
    last_task_id: str = ""
    fires: int = 0  # tasks fired
    missed_ticks: int = 0  # ticks that fired nothing (coalesced into a later one, or skipped)
    last_error: str = ""  # why the last tick fired nothing (the task was refused), else ""


class TaskStore(Protocol):
    """Task records, their first messages and dead letters (see the module docstring)."""

    async def insert(self, record: TaskRecord) -> None:
        """Add a task record as it is (no message kept); an existing id raises."""

    async def insert_unconfirmed(self, record: TaskRecord, queue: str, body: bytes) -> None:
        """Add a task with the message still to be confirmed by RabbitMQ; durable on return.
        A key a stored task already has (stored here or by another server of the store):
        IdempotencyKeyTaken, nothing stored."""

    async def confirm(self, task_id: str) -> None:
        """RabbitMQ confirmed the task's message: nothing left to resend (may be written later)."""

    async def delete(self, task_id: str) -> None:
        """Forget a task whose publish failed: its record, unconfirmed row and message."""

    async def unconfirmed(self, task_id: str | None = None) -> list[tuple[str, str, bytes]]:
        """(task id, queue, body) of tasks stored but never confirmed (this one only, if given)."""

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's record, or None."""

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The records of those of these tasks that exist, in no particular order."""

    async def find_by_idempotency_key(self, key: str) -> TaskRecord | None:
        """The task submitted under this (non-empty) idempotency key, or None."""

    async def message(self, task_id: str) -> bytes | None:
        """The task's first message as submitted here; None once final or if submitted elsewhere."""

    async def overdue_retries(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """RETRYING tasks of a logical queue whose next attempt was due before `due_before_s`."""

    async def overdue_runs(self, deadline_before_s: float, limit: int) -> list[TaskRecord]:
        """RUNNING tasks whose time limit ran out before `deadline_before_s`, oldest first."""

    async def overdue_scheduled(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """SCHEDULED tasks of a logical queue that were due before `due_before_s` (never started)."""

    async def queued_before(self, queue: str, created_before_s: float, limit: int) -> list[TaskRecord]:
        """QUEUED tasks of a logical queue created before `created_before_s`, oldest first."""

    async def claim_reconcile(self, every_s: float) -> bool:
        """Whether this server sweeps for lost tasks now (qm/server/reconciler.py): with a
        store shared by several servers, the first to ask once `every_s` has passed since
        the last sweep of any of them; with a store of one server, always."""

    async def count(self) -> int:
        """Tasks in the store (from a kept counter, not a count of rows)."""

    async def purge_finished(self, before_s: float, limit: int) -> int:
        """Delete up to `limit` tasks finished before `before_s`; return how many."""

    async def apply(self, events: Iterable[TaskEvent], codec_of: dict[str, str]) -> list[TaskRecord]:
        """Apply events (idempotently, durably); return every record change, in order."""

    async def insert_group(self, group: GroupRecord, members: list[tuple[TaskRecord, str, bytes]]) -> None:
        """Store a group and its members (record, queue, message body), each unconfirmed, in
        one transaction; durable on return. A key another server stored first:
        IdempotencyKeyTaken (nothing stored)."""

    async def get_group(self, group_id: str) -> GroupRecord | None:
        """The group's record, or None."""

    async def find_group_by_idempotency_key(self, key: str) -> GroupRecord | None:
        """The group submitted under this (non-empty) idempotency key, or None."""

    async def group_members(self, group_id: str) -> list[tuple[str, TaskState]]:
        """(task id, state) of the group's members, in member order."""

    async def add_dead_letter(self, dead: DeadLetter) -> None:
        """Record a dead letter (replacing the task's earlier one)."""

    async def dead_letters(
        self, limit: int, task_ids: list[str] | None = None, bodies: bool = True
    ) -> tuple[list[DeadLetter], int]:
        """Dead letters oldest first (these ids only, if given), and how many there are in all;
        bodies=False leaves the message bodies unread (b"")."""

    async def count_dead_letters(self) -> int:
        """Dead letters in the store (from a kept counter)."""

    async def remove_dead_letters(
        self, task_ids: list[str] | None = None, limit: int = 1000, dead_before_s: float = math.inf
    ) -> int:
        """Remove these dead letters, or if None up to `limit` of the oldest (dead before
        `dead_before_s` only); return how many."""

    # -- periodic schedules (qm/server/scheduler.py) --------------------------------------

    async def add_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Store a new schedule; if its id is taken, change nothing and return the stored one."""

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        """The schedule, or None."""

    async def list_schedules(self, after_id: str, limit: int) -> list[ScheduleRecord]:
        """Up to `limit` schedules with ids after `after_id` ("" = from the first), by id."""

    async def remove_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        """Delete the schedule; the row as deleted (after any claim committed before), or None."""

    async def count_schedules(self) -> int:
        """Schedules in the store (from a kept counter)."""

    async def due_schedules(self, now_s: float, limit: int) -> list[ScheduleRecord]:
        """Up to `limit` schedules whose next tick is at or before `now_s`, earliest first."""

    async def next_schedule_at(self) -> float | None:
        """The earliest next tick of any schedule, or None without schedules."""

    async def claim_tick(
        self,
        schedule_id: str,
        due_s: float,
        next_s: float,
        fired: tuple[TaskRecord, str, bytes] | None,
        *,
        tick_s: float | None = None,
        missed: int = 0,
        error: str = "",
    ) -> bool:
        """Move the schedule from its tick due at `due_s` on to `next_s`, only if it is still
        due there (a compare-and-set: of several servers looking at one tick, one wins), and
        in the same transaction store `fired` (record, queue, body) as `insert_unconfirmed`
        does. Records `tick_s` as the last tick fired (with `fired`), adds `missed` to the
        missed ticks and keeps `error`. Durable on return; False (nothing written) if
        another server claimed the tick or the schedule is gone."""

    async def close(self) -> None:
        """Write what is pending, then release connections and threads."""
