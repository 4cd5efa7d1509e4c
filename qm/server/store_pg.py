"""PostgreSQL store of task state, shared by every qm-server that names it (asyncpg).

Several servers, one store: one row per task, idempotency keys unique across servers (a
unique index: the second server's insert fails and it answers with the first task), one
dead-letter table, retention that deletes each row once (`FOR UPDATE SKIP LOCKED`: two
sweeping servers take different rows). Events are applied once per store: the servers
consume one shared events queue as competing consumers (qm/server/service.py), and a
batch locks its tasks' rows (in task-id order, so two servers never deadlock) before
folding the events in, exactly as the SQLite store does (`qm.states.supersedes`).

Stream followers live in each server's memory, so a change applied by one server must
wake the others' followers: the applying transaction sends `NOTIFY qm_task_changes` with
the changed task ids (PostgreSQL delivers it only once the transaction commits, to every
listening session). `ChangeListener` holds one connection per server that LISTENs and
hands the ids on; the server reads the current record of the ones it follows. Chosen over
a per-server fanout queue because it is transactional (no wake-up for a change that
rolled back, none lost between the commit and a publish) and needs no second copy of
every event in RabbitMQ; a listener that lost its connection reports "anything may have
changed" once it is back, and the server reads every followed task again.

PostgreSQL unreachable (down, restarting, failing over): every call raises
`StoreUnavailable` naming the store, which the API answers UNAVAILABLE (clients retry)
and the event applier answers by keeping its batch unacked and trying again. The pool
replaces broken connections by itself, so nothing needs a restart when it comes back.

Schema: qm/server/pg_schema.py (versioned, migrated at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import operator
import secrets
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

import asyncpg

from qm.config import redact_url
from qm.errors import IdempotencyKeyTaken, StoreSchemaError, StoreUnavailable
from qm.frozen import from_values
from qm.messages import TaskEvent
from qm.server import pg_schema
from qm.server.group_callback import callback_task
from qm.server.pg_batches import BatchedWrites
from qm.server.store import DELETE_BATCH_ROWS, fold_events, newly_finished
from qm.server.store_api import DeadLetter, GroupRecord, ScheduleRecord, TaskRecord
from qm.states import TaskState

log = logging.getLogger(__name__)

#: The NOTIFY channel that carries changed task ids between the servers of a store.
CHANGES_CHANNEL = "qm_task_changes"
#: Bytes of task ids per notification (PostgreSQL's payload limit is 8000 bytes).
NOTIFY_PAYLOAD_BYTES = 7000
#: Seconds a connection attempt may take before the store counts as unavailable.
CONNECT_TIMEOUT_S = 5.0
#: Longest pause between two attempts of the change listener to connect again.
LISTEN_RETRY_MAX_S = 5.0
#: How long a repeated submit waits for the server that stored its task to get the
#: message confirmed, and how often it looks (a confirm takes milliseconds).
OTHERS_CONFIRM_WAIT_S = 5.0
OTHERS_CONFIRM_POLL_S = 0.02
#: Pause before writing confirm marks again while the store is unavailable.
CONFIRM_RETRY_S = 1.0
#: Longest wait at close for the confirm marks still to be written.
CLOSE_FLUSH_S = 5.0
#: Times a batch of events is tried again after a conflict with another server's batch
#: (a deadlock or a task both inserted first); each try is a fresh transaction.
APPLY_CONFLICT_TRIES = 5

_COLUMNS = [field.name for field in dataclasses.fields(TaskRecord)]
_DEAD_COLUMNS = [field.name for field in dataclasses.fields(DeadLetter)]
_SCHEDULE_COLUMNS = [field.name for field in dataclasses.fields(ScheduleRecord)]
_SELECT_SCHEDULES = f"SELECT {', '.join(_SCHEDULE_COLUMNS)} FROM schedules"
#: The compare-and-set of a schedule's tick; see Store's _CLAIM_TICK. Under READ COMMITTED
#: a second server's UPDATE waits for the first one's row lock, then finds the new
#: next_fire_at and changes nothing.
_CLAIM_TICK = (
    "UPDATE schedules SET next_fire_at = $1, last_tick_at = coalesce($2, last_tick_at), "
    "last_task_id = coalesce($3, last_task_id), fires = fires + $4, missed_ticks = missed_ticks + $5, "
    "last_error = $6 WHERE schedule_id = $7 AND next_fire_at = $8"
)
_SELECT_TASK = f"SELECT {', '.join(_COLUMNS)} FROM tasks"
_GROUP_COLUMNS = [field.name for field in dataclasses.fields(GroupRecord)]
_SELECT_GROUP = f"SELECT {', '.join(_GROUP_COLUMNS)} FROM task_groups"
_INSERT_GROUP = (
    f"INSERT INTO task_groups ({', '.join(_GROUP_COLUMNS)}) "
    f"VALUES ({', '.join(f'${n}' for n in range(1, len(_GROUP_COLUMNS) + 1))})"
)
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join(f'${n}' for n in range(1, len(_COLUMNS) + 1))})"
)
_INSERT_UNCONFIRMED = (
    f"WITH task AS ({_INSERT_TASK}), "
    f"pending AS (INSERT INTO unconfirmed (task_id, queue, body, server_id) "
    f"VALUES ($1, ${len(_COLUMNS) + 1}, ${len(_COLUMNS) + 2}, ${len(_COLUMNS) + 3})) "
    f"INSERT INTO messages (task_id, body) VALUES ($1, ${len(_COLUMNS) + 2}) "
    "ON CONFLICT (task_id) DO UPDATE SET body = excluded.body"
)
_UPDATE_TASK = (
    f"UPDATE tasks SET {', '.join(f'{c} = ${n}' for n, c in enumerate(_COLUMNS[1:], start=2))} WHERE task_id = $1"
)
_UPSERT_DEAD = (
    f"INSERT INTO dead_letters ({', '.join(_DEAD_COLUMNS)}) "
    f"VALUES ({', '.join(f'${n}' for n in range(1, len(_DEAD_COLUMNS) + 1))}) "
    f"ON CONFLICT (task_id) DO UPDATE SET "
    f"{', '.join(f'{c} = excluded.{c}' for c in _DEAD_COLUMNS[1:])}"
)

#: What asyncpg raises when the server cannot be reached or went away mid-call.
#: InternalClientError ("cannot switch to state ...; another operation is in progress") is
#: what a session the server cut mid-operation (a fast shutdown) raises on its next use.
_UNREACHABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError, asyncpg.SerializationError)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class PgStore:
    """The TaskStore seam on PostgreSQL. `PgStore(url, server_id)`, then `await connect()`
    (or `await PgStore.open(url, server_id)`): connects, migrates the schema; `store_id`
    then names what the servers of this store share."""

    def __init__(self, url: str, server_id: str, pool_size: int = 10) -> None:
        self.url = url
        self.server_id = server_id
        self.pool_size = pool_size
        self.store_id = ""
        self._pool: asyncpg.Pool | None = None
        self._confirmed: set[str] = set()  # confirm marks not yet written
        self._flusher: asyncio.Task | None = None
        self._inserts = BatchedWrites(
            self._insert_unconfirmed_many, self._insert_unconfirmed_one, alone_on=asyncpg.UniqueViolationError
        )

    @classmethod
    async def open(cls, url: str, server_id: str, pool_size: int = 10) -> PgStore:
        store = cls(url, server_id, pool_size)
        await store.connect()
        return store

    async def connect(self) -> None:
        """Connect a pool of up to `pool_size` connections and bring the schema to this
        code's version. Unreachable: StoreUnavailable; a newer schema: StoreSchemaError."""
        shown = redact_url(self.url)
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT_S,
                reset=_keep_session,
                server_settings={"application_name": f"qm-server {self.server_id}"},
            )
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"PostgreSQL store {shown} cannot be reached: {_describe(exc)}") from exc
        except asyncpg.PostgresError as exc:  # e.g. no such database, authentication
            raise StoreUnavailable(f"PostgreSQL store {shown} refused the connection: {_describe(exc)}") from exc
        try:
            async with pool.acquire() as connection:
                self.store_id = await migrate(connection, shown)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Finish the inserts under way, write the pending confirm marks (for up to
        CLOSE_FLUSH_S), then disconnect."""
        await self._inserts.close()
        if self._flusher is not None and not self._flusher.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._flusher), CLOSE_FLUSH_S)
            except asyncio.TimeoutError:
                self._flusher.cancel()
        if self._pool is not None:
            await self._pool.close()

    # -- plumbing ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (in a transaction, if asked); unreachable → StoreUnavailable."""
        assert self._pool is not None, "PgStore used before connect()"
        try:
            # No acquire timeout: a busy pool is queued for, not "unavailable"; a new
            # connection's attempt is bounded by the pool's connect timeout.
            async with self._pool.acquire() as connection:
                try:
                    if transaction:
                        async with connection.transaction():
                            yield connection
                    else:
                        yield connection
                except _UNREACHABLE:
                    connection.terminate()  # never back into the pool half-broken
                    raise
        except _UNREACHABLE as exc:
            raise StoreUnavailable(
                f"PostgreSQL store {redact_url(self.url)} is unavailable: {_describe(exc)}; retry when it is back"
            ) from exc

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as connection:
            return await connection.fetch(query, *args)

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as connection:
            return await connection.fetchrow(query, *args)

    async def _execute(self, query: str, *args: Any) -> int:
        async with self._connection() as connection:
            return _rowcount(await connection.execute(query, *args))

    # -- tasks -------------------------------------------------------------------------

    async def insert(self, record: TaskRecord) -> None:
        async with self._connection() as connection:
            await _insert_task(connection, record)

    async def insert_unconfirmed(self, record: TaskRecord, queue: str, body: bytes) -> None:
        """Store a task with the message this server still has to get confirmed: one
        statement; the inserts of the same moment share one transaction and round trip
        (qm/server/pg_batches.py). A key another server stored first: IdempotencyKeyTaken
        (nothing stored)."""
        try:
            await self._inserts.write((*_row(record), queue, body, self.server_id))
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "tasks_by_idempotency_key":
                raise IdempotencyKeyTaken(record.idempotency_key) from None
            raise

    async def _insert_unconfirmed_many(self, rows: Sequence[tuple]) -> None:
        async with self._connection() as connection:
            await connection.executemany(_INSERT_UNCONFIRMED, rows)

    async def _insert_unconfirmed_one(self, row: tuple) -> None:
        async with self._connection() as connection:
            await connection.execute(_INSERT_UNCONFIRMED, *row)

    async def confirm(self, task_id: str) -> None:
        """Deferred (as the seam allows): the confirms of one loop turn, or of the time the
        previous flush took, are deleted in one statement, off the submit's path; until
        then `unconfirmed()` leaves them out. Lost in a crash, they only make the restarted
        server publish those messages again (at-least-once)."""
        self._confirmed.add(task_id)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_confirms(), name="store-confirms")

    async def _flush_confirms(self) -> None:
        await asyncio.sleep(0)  # let the other confirms of this loop turn join
        while self._confirmed:
            batch = list(self._confirmed)
            try:
                await self._execute("DELETE FROM unconfirmed WHERE task_id = ANY($1::text[])", batch)
            except StoreUnavailable as exc:
                log.warning("%d confirm mark(s) wait for the store: %s", len(batch), exc)
                await asyncio.sleep(CONFIRM_RETRY_S)
                continue
            self._confirmed.difference_update(batch)

    async def delete(self, task_id: str) -> None:
        async with self._connection(transaction=True) as connection:
            for table in ("tasks", "unconfirmed", "messages"):
                await connection.execute(f"DELETE FROM {table} WHERE task_id = $1", task_id)

    async def insert_group(self, group: GroupRecord, members: list[tuple[TaskRecord, str, bytes]]) -> None:
        """The group row and its members, each unconfirmed (published by this server), in
        one transaction. A key another server stored first: IdempotencyKeyTaken."""
        async with self._connection(transaction=True) as connection:
            try:
                await connection.execute(_INSERT_GROUP, *dataclasses.astuple(group))
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "task_groups_by_idempotency_key":
                    raise IdempotencyKeyTaken(group.idempotency_key) from None
                raise
            await connection.executemany(_INSERT_TASK, [_row(record) for record, _queue, _body in members])
            await connection.executemany(
                "INSERT INTO unconfirmed (task_id, queue, body, server_id) VALUES ($1, $2, $3, $4)",
                [(record.task_id, queue, body, self.server_id) for record, queue, body in members],
            )
            await connection.executemany(
                "INSERT INTO messages (task_id, body) VALUES ($1, $2)",
                [(record.task_id, body) for record, _queue, body in members],
            )

    async def get_group(self, group_id: str) -> GroupRecord | None:
        row = await self._fetchrow(f"{_SELECT_GROUP} WHERE group_id = $1", group_id)
        return _group(row) if row is not None else None

    async def find_group_by_idempotency_key(self, key: str) -> GroupRecord | None:
        row = await self._fetchrow(f"{_SELECT_GROUP} WHERE idempotency_key = $1 AND idempotency_key <> ''", key)
        return _group(row) if row is not None else None

    async def group_members(self, group_id: str) -> list[tuple[str, TaskState]]:
        rows = await self._fetch(
            "SELECT task_id, state FROM tasks WHERE group_id = $1 AND group_id <> '' AND group_index >= 0 "
            "ORDER BY group_index",
            group_id,
        )
        return [(row[0], TaskState(row[1])) for row in rows]

    async def unconfirmed(self, task_id: str | None = None) -> list[tuple[str, str, bytes]]:
        """This server's unconfirmed messages (another live server publishes its own), or
        the one of `task_id` whoever stored it: a repeated submit landing here. If another
        server stored it just now, it is publishing it: wait (up to OTHERS_CONFIRM_WAIT_S)
        for its confirm rather than publish a second copy; still there after that, that
        server is gone, and this one publishes it."""
        if task_id is None:
            rows = await self._fetch(
                "SELECT task_id, queue, body FROM unconfirmed WHERE server_id = $1", self.server_id
            )
            return [(row[0], row[1], bytes(row[2])) for row in rows if row[0] not in self._confirmed]
        if task_id in self._confirmed:
            return []
        deadline = asyncio.get_running_loop().time() + OTHERS_CONFIRM_WAIT_S
        while True:
            row = await self._fetchrow(
                "SELECT task_id, queue, body, server_id <> $2 AND stored_at > now() - make_interval(secs => $3) "
                "FROM unconfirmed WHERE task_id = $1",
                task_id,
                self.server_id,
                OTHERS_CONFIRM_WAIT_S,
            )
            if row is None:
                return []
            if not row[3] or asyncio.get_running_loop().time() >= deadline:
                return [(row[0], row[1], bytes(row[2]))]
            await asyncio.sleep(OTHERS_CONFIRM_POLL_S)

    async def get(self, task_id: str) -> TaskRecord | None:
        row = await self._fetchrow(f"{_SELECT_TASK} WHERE task_id = $1", task_id)
        return _record(row) if row is not None else None

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The records of these tasks that exist: one query (streams following them)."""
        rows = await self._fetch(f"{_SELECT_TASK} WHERE task_id = ANY($1::text[])", list(task_ids))
        return [_record(row) for row in rows]

    async def find_by_idempotency_key(self, key: str) -> TaskRecord | None:
        row = await self._fetchrow(f"{_SELECT_TASK} WHERE idempotency_key = $1 AND idempotency_key <> ''", key)
        return _record(row) if row is not None else None

    async def message(self, task_id: str) -> bytes | None:
        """Any unfinished task's first message, whichever server of the store took it."""
        row = await self._fetchrow("SELECT body FROM messages WHERE task_id = $1", task_id)
        return bytes(row[0]) if row is not None else None

    async def overdue_retries(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        return await self._due(TaskState.RETRYING, queue, due_before_s, limit)

    async def overdue_scheduled(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        return await self._due(TaskState.SCHEDULED, queue, due_before_s, limit)

    async def _due(self, state: TaskState, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """Tasks in `state` of a queue whose next_attempt_at passed, by due time (a partial index each)."""
        rows = await self._fetch(
            f"{_SELECT_TASK} WHERE state = {int(state)} AND queue = $1 "
            "AND next_attempt_at < $2 ORDER BY next_attempt_at LIMIT $3",
            queue,
            due_before_s,
            limit,
        )
        return [_record(row) for row in rows]

    async def overdue_runs(self, deadline_before_s: float, limit: int) -> list[TaskRecord]:
        rows = await self._fetch(
            f"{_SELECT_TASK} WHERE state = {int(TaskState.RUNNING)} "
            "AND started_at + timeout_s < $1 AND timeout_s > 0 "
            "ORDER BY started_at + timeout_s LIMIT $2",
            deadline_before_s,
            limit,
        )
        return [_record(row) for row in rows]

    async def queued_before(self, queue: str, created_before_s: float, limit: int) -> list[TaskRecord]:
        rows = await self._fetch(
            f"{_SELECT_TASK} WHERE state = {int(TaskState.QUEUED)} AND queue = $1 "
            "AND created_at < $2 ORDER BY created_at LIMIT $3",
            queue,
            created_before_s,
            limit,
        )
        return [_record(row) for row in rows]

    async def claim_reconcile(self, every_s: float) -> bool:
        """One server of the store per `every_s`: the UPDATE that finds the last sweep old
        enough wins; another one at the same moment waits on the row, then finds it fresh.
        Database time, so the servers' clocks need not agree."""
        return (
            await self._execute(
                "UPDATE sweeps SET swept_at = extract(epoch FROM clock_timestamp()) "
                "WHERE name = 'reconcile' AND swept_at <= extract(epoch FROM clock_timestamp()) - $1",
                every_s,
            )
            == 1
        )

    async def count(self) -> int:
        return await self._counter("tasks")

    async def _counter(self, name: str) -> int:
        row = await self._fetchrow("SELECT coalesce(sum(value), 0)::bigint FROM counters WHERE name = $1", name)
        return int(row[0]) if row is not None else 0

    async def purge_finished(self, before_s: float, limit: int = DELETE_BATCH_ROWS) -> int:
        """Delete up to `limit` tasks finished before `before_s`, oldest first; rows another
        server is deleting right now are skipped, so each row is deleted once. (`= ANY(ARRAY(
        ...))`, not `IN (...)`: the planner would hash-join a batch of 1,000 ids against a
        sequential scan of the table; an array of ids is looked up through the key.)"""
        await self._execute(
            "DELETE FROM task_groups WHERE group_id = ANY(ARRAY(SELECT group_id FROM task_groups "
            "WHERE completed_at IS NOT NULL AND completed_at < $1 ORDER BY completed_at LIMIT $2 "
            "FOR UPDATE SKIP LOCKED))",
            before_s,
            limit,
        )
        return await self._execute(
            "DELETE FROM tasks WHERE task_id = ANY(ARRAY(SELECT task_id FROM tasks WHERE finished_at IS NOT NULL "
            "AND finished_at < $1 ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
            before_s,
            limit,
        )

    # -- events ------------------------------------------------------------------------

    async def apply(self, events: Iterable[TaskEvent], codec_of: dict[str, str]) -> list[TaskRecord]:
        """Apply events in one transaction (their tasks' rows locked, so another server's
        batch waits), tell the other servers which tasks changed, return every change."""
        events = list(events)
        if not events:
            return []
        for attempt in range(1, APPLY_CONFLICT_TRIES + 1):
            try:
                return await self._apply_once(events, codec_of)
            except _CONFLICTS as exc:  # another server's batch got there first: read again
                if attempt == APPLY_CONFLICT_TRIES:
                    raise
                log.info("events batch met another server's (%s); applying it again", type(exc).__name__)
        raise AssertionError("unreachable")

    async def _apply_once(self, events: list[TaskEvent], codec_of: dict[str, str]) -> list[TaskRecord]:
        task_ids = sorted({event.task_id for event in events})
        async with self._connection(transaction=True) as connection:
            rows = await connection.fetch(
                f"{_SELECT_TASK} WHERE task_id = ANY($1::text[]) ORDER BY task_id FOR UPDATE", task_ids
            )
            locked = {row["task_id"]: _record(row) for row in rows}
            latest, stored, changes = fold_events(events, locked.get, codec_of)
            new = [_row(record) for record in latest.values() if record.task_id not in stored]
            updated = [
                _row(record)
                for record in latest.values()
                if record.task_id in stored and record != stored[record.task_id]
            ]
            if new:
                await connection.executemany(_INSERT_TASK, new)
            if updated:
                await connection.executemany(_UPDATE_TASK, updated)
            final = [record.task_id for record in latest.values() if record.state.terminal]
            if final:
                await connection.execute("DELETE FROM messages WHERE task_id = ANY($1::text[])", final)
            for group_id, count in sorted(newly_finished(latest, stored).items()):
                callback = await self._count_finished(connection, group_id, count, codec_of)
                if callback is not None:
                    changes.append(callback)
            payloads = _notifications(self.server_id, [record.task_id for record in latest.values()])
            if payloads:
                await connection.execute(
                    "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload", CHANGES_CHANNEL, payloads
                )
        return changes

    async def _count_finished(
        self, connection: asyncpg.Connection, group_id: str, count: int, codec_of: dict[str, str]
    ) -> TaskRecord | None:
        """Count `count` more finished members. The group row is locked by the update, so
        of two servers' batches the second sees the first's count; the one whose update
        counts the last member (completed_at set by it) stores the callback, unconfirmed,
        published by this server (or by its restart)."""
        now = time.time()
        row = await connection.fetchrow(
            "UPDATE task_groups SET finished = finished + $1, "
            "completed_at = CASE WHEN finished + $1 >= members THEN $2::double precision ELSE NULL END "
            f"WHERE group_id = $3 AND completed_at IS NULL RETURNING {', '.join(_GROUP_COLUMNS)}",
            count,
            now,
            group_id,
        )
        if row is None or row["completed_at"] is None or not row["callback_body"]:
            return None
        members = await connection.fetch(
            f"{_SELECT_TASK} WHERE group_id = $1 AND group_id <> '' AND group_index >= 0 ORDER BY group_index", group_id
        )
        record, queue, body = callback_task(_group(row), [_record(member) for member in members], codec_of, now)
        await connection.execute(_INSERT_UNCONFIRMED, *_row(record), queue, body, self.server_id)
        return record

    # -- dead letters ------------------------------------------------------------------

    async def add_dead_letter(self, dead: DeadLetter) -> None:
        await self._execute(_UPSERT_DEAD, *_dead_row(dead))

    async def dead_letters(
        self, limit: int, task_ids: list[str] | None = None, bodies: bool = True
    ) -> tuple[list[DeadLetter], int]:
        """Dead letters, oldest first (these ids only, if given), and how many in all;
        bodies=False leaves the message bodies unread (b"")."""
        columns = _DEAD_COLUMNS if bodies else [c if c != "body" else "''::bytea AS body" for c in _DEAD_COLUMNS]
        query = f"SELECT {', '.join(columns)} FROM dead_letters"
        if task_ids is None:
            rows = await self._fetch(f"{query} ORDER BY dead_at LIMIT $1", limit)
        else:
            rows = await self._fetch(
                f"{query} WHERE task_id = ANY($1::text[]) ORDER BY dead_at LIMIT $2", list(task_ids), limit
            )
        return [_dead_letter(row) for row in rows], await self.count_dead_letters()

    async def count_dead_letters(self) -> int:
        return await self._counter("dead_letters")

    async def remove_dead_letters(
        self, task_ids: list[str] | None = None, limit: int = DELETE_BATCH_ROWS, dead_before_s: float = math.inf
    ) -> int:
        """Remove these dead letters, or if None up to `limit` of the oldest (dead before
        `dead_before_s` only: retention), skipping rows another server is deleting."""
        if task_ids is None:
            return await self._execute(
                "DELETE FROM dead_letters WHERE task_id = ANY(ARRAY(SELECT task_id FROM dead_letters "
                "WHERE dead_at < $1 ORDER BY dead_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
                dead_before_s,
                limit,
            )
        return await self._execute("DELETE FROM dead_letters WHERE task_id = ANY($1::text[])", list(task_ids))

    # -- periodic schedules ------------------------------------------------------------

    async def add_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Store a new schedule; an id already taken (by any server) changes nothing."""
        async with self._connection(transaction=True) as connection:
            await connection.execute(
                f"INSERT INTO schedules ({', '.join(_SCHEDULE_COLUMNS)}) "
                f"VALUES ({', '.join(f'${n}' for n in range(1, len(_SCHEDULE_COLUMNS) + 1))}) "
                "ON CONFLICT (schedule_id) DO NOTHING",
                *dataclasses.astuple(schedule),
            )
            row = await connection.fetchrow(f"{_SELECT_SCHEDULES} WHERE schedule_id = $1", schedule.schedule_id)
        return _schedule(row)

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        row = await self._fetchrow(f"{_SELECT_SCHEDULES} WHERE schedule_id = $1", schedule_id)
        return _schedule(row) if row is not None else None

    async def list_schedules(self, after_id: str, limit: int) -> list[ScheduleRecord]:
        rows = await self._fetch(
            f"{_SELECT_SCHEDULES} WHERE schedule_id > $1 ORDER BY schedule_id LIMIT $2", after_id, limit
        )
        return [_schedule(row) for row in rows]

    async def remove_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        """Waits for a claim of the row in progress: the row returned has its fires."""
        row = await self._fetchrow(
            f"DELETE FROM schedules WHERE schedule_id = $1 RETURNING {', '.join(_SCHEDULE_COLUMNS)}", schedule_id
        )
        return _schedule(row) if row is not None else None

    async def count_schedules(self) -> int:
        return await self._counter("schedules")

    async def due_schedules(self, now_s: float, limit: int) -> list[ScheduleRecord]:
        rows = await self._fetch(
            f"{_SELECT_SCHEDULES} WHERE next_fire_at <= $1 ORDER BY next_fire_at LIMIT $2", now_s, limit
        )
        return [_schedule(row) for row in rows]

    async def next_schedule_at(self) -> float | None:
        row = await self._fetchrow("SELECT next_fire_at FROM schedules ORDER BY next_fire_at LIMIT 1")
        return row[0] if row is not None else None

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
        """The compare-and-set and the fired task's rows in one transaction: a crash leaves
        both or neither; a key another server stored first: IdempotencyKeyTaken, nothing written."""
        task_id = fired[0].task_id if fired else None
        async with self._connection(transaction=True) as connection:
            status = await connection.execute(
                _CLAIM_TICK, next_s, tick_s, task_id, 1 if fired else 0, missed, error, schedule_id, due_s
            )
            if _rowcount(status) != 1:
                return False
            if fired is not None:
                record, queue, body = fired
                try:
                    await connection.execute(_INSERT_UNCONFIRMED, *_row(record), queue, body, self.server_id)
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name == "tasks_by_idempotency_key":
                        raise IdempotencyKeyTaken(record.idempotency_key) from None
                    raise
        return True

    # -- other servers' changes --------------------------------------------------------

    def listen(self, on_changes: Callable[[list[str] | None], Awaitable[None]]) -> ChangeListener:
        """A listener for the changes other servers of this store apply (start it)."""
        return ChangeListener(self.url, self.server_id, on_changes)


class ChangeListener:
    """LISTENs on CHANGES_CHANNEL over a connection of its own and calls
    `on_changes(task ids)` for every other server's notification, or `on_changes(None)`
    after (re)connecting: notifications sent meanwhile are lost, anything may have changed."""

    def __init__(self, url: str, server_id: str, on_changes: Callable[[list[str] | None], Awaitable[None]]) -> None:
        self.url = url
        self.server_id = server_id
        self.on_changes = on_changes
        self._task: asyncio.Task | None = None
        self._pending: asyncio.Queue[list[str] | None] = asyncio.Queue()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-change-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay_s = 0.1
        while True:
            try:
                connection = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT_S)
            except (*_UNREACHABLE, asyncpg.PostgresError) as exc:
                log.warning(
                    "store change listener: cannot connect to %s: %s; again in %.1f s",
                    redact_url(self.url),
                    _describe(exc),
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, LISTEN_RETRY_MAX_S)
                continue
            delay_s = 0.1
            try:
                await self._listen(connection)
                log.warning("store change listener: connection to %s lost; reconnecting", redact_url(self.url))
            except _UNREACHABLE as exc:
                log.warning("store change listener: %s; reconnecting", _describe(exc))
            finally:
                connection.terminate()

    async def _listen(self, connection: asyncpg.Connection) -> None:
        """Listen on this connection until it is lost."""
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        await connection.add_listener(CHANGES_CHANNEL, self._on_notification)
        self._pending.put_nowait(None)  # caught up: whatever happened while not listening
        await self._deliver_until(lost)

    async def _deliver_until(self, lost: asyncio.Event) -> None:
        lost_wait = asyncio.ensure_future(lost.wait())
        try:
            while not lost.is_set():
                got = asyncio.ensure_future(self._pending.get())
                await asyncio.wait({got, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    return
                task_ids = got.result()
                try:
                    await self.on_changes(task_ids)
                except StoreUnavailable as exc:
                    log.warning("store change listener: cannot read changed tasks: %s", exc)
        finally:
            lost_wait.cancel()

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        sender, _, ids = payload.partition("|")
        if sender != self.server_id and ids:
            self._pending.put_nowait(ids.split(","))


async def migrate(connection: asyncpg.Connection, shown_url: str) -> str:
    """Bring the schema to pg_schema.SCHEMA_VERSION under the migration lock; return the
    store id. A newer schema than this code knows: StoreSchemaError."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", pg_schema.MIGRATION_LOCK_KEY)
        await connection.execute(pg_schema.BOOKKEEPING)
        row = await connection.fetchrow("SELECT version, store_id FROM qm_schema")
        if row is None:
            version, store_id = 0, f"pg-{secrets.token_hex(4)}"
            await connection.execute("INSERT INTO qm_schema (version, store_id) VALUES (0, $1)", store_id)
        else:
            version, store_id = row["version"], row["store_id"]
        if version > pg_schema.SCHEMA_VERSION:
            raise StoreSchemaError(
                f"the PostgreSQL store {shown_url} has schema version {version}, newer than this QueueMaster "
                f"knows (up to {pg_schema.SCHEMA_VERSION}): a newer qm-server migrated it. Run that version "
                "(or newer) here too; an older server must not write a store it does not understand"
            )
        for number in range(version + 1, pg_schema.SCHEMA_VERSION + 1):
            await connection.execute(pg_schema.MIGRATIONS[number - 1])
            await connection.execute("UPDATE qm_schema SET version = $1", number)
            log.info("PostgreSQL store %s: schema migrated to version %d", shown_url, number)
    return store_id


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """The pool's reset of a released connection. asyncpg's default runs a reset query
    (RESET ALL, UNLISTEN *, ...) on every release: a round trip per store call, for session
    state this store never sets (an open transaction is still rolled back first)."""


async def _insert_task(connection: asyncpg.Connection, record: TaskRecord) -> None:
    try:
        await connection.execute(_INSERT_TASK, *_row(record))
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "tasks_by_idempotency_key":
            raise IdempotencyKeyTaken(record.idempotency_key) from None
        raise


def _notifications(server_id: str, task_ids: list[str]) -> list[str]:
    """`server id|id,id,...` payloads under NOTIFY_PAYLOAD_BYTES each."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = len(server_id) + 1
    for task_id in task_ids:
        if chunk and size + len(task_id) + 1 > NOTIFY_PAYLOAD_BYTES:
            payloads.append(f"{server_id}|{','.join(chunk)}")
            chunk, size = [], len(server_id) + 1
        chunk.append(task_id)
        size += len(task_id) + 1
    if chunk:
        payloads.append(f"{server_id}|{','.join(chunk)}")
    return payloads


def _rowcount(status: str) -> int:
    """Rows affected, from a command tag such as 'DELETE 12'."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: A task record's column values in _COLUMNS order (dataclasses.astuple deep-copies every
#: field: 5 % of the server's time under submit_many).
_task_values: Callable[[TaskRecord], tuple] = operator.attrgetter(*_COLUMNS)
_STATE_INDEX = _COLUMNS.index("state")
_RESULT_INDEX = _COLUMNS.index("result")


def _row(record: TaskRecord) -> tuple:
    values = _task_values(record)
    return values[:_STATE_INDEX] + (int(record.state),) + values[_STATE_INDEX + 1 :]


def _dead_row(dead: DeadLetter) -> tuple:
    values = dataclasses.astuple(dead)
    return values[:3] + (int(dead.state),) + values[4:]


def _record(row: asyncpg.Record) -> TaskRecord:
    values = list(row)
    values[_STATE_INDEX] = TaskState(values[_STATE_INDEX])
    if values[_RESULT_INDEX] is not None:
        values[_RESULT_INDEX] = bytes(values[_RESULT_INDEX])
    return from_values(TaskRecord, values)


def _schedule(row: asyncpg.Record) -> ScheduleRecord:
    values = dict(zip(_SCHEDULE_COLUMNS, row, strict=True))
    values["payload"] = bytes(values["payload"])
    return ScheduleRecord(**values)


def _group(row: asyncpg.Record) -> GroupRecord:
    values = dict(zip(_GROUP_COLUMNS, row, strict=True))
    values["callback_body"] = bytes(values["callback_body"])
    return GroupRecord(**values)


def _dead_letter(row: asyncpg.Record) -> DeadLetter:
    values = dict(zip(_DEAD_COLUMNS, row, strict=True))
    values["state"] = TaskState(values["state"])
    values["body"] = bytes(values["body"])
    return DeadLetter(**values)
