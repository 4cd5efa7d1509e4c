"""SQLite store of task state: this server's replica, fed by its own events queue.

WAL mode with synchronous=NORMAL: a crash may lose the last commits, never corrupt the
file, and anything lost is replayed from the durable events queue (events are acked
only after the transaction that applied them committed).

Cost must not grow with the store: every statement the server issues while it serves
finds its rows through an index (SEARCH, never a SCAN of tasks or dead_letters; proved by
tests/unit/test_store_plans.py), sizes are kept in `counters` by triggers in the same
transactions (no COUNT(*)), retention deletes in bounded batches, and WAL checkpoints run
on a thread of their own (`start_checkpoints`), leaving the writer thread only the short
checkpoint that lets the WAL start over every 32 MiB.

The event loop runs no write: writes are grouped into shared transactions on the writer
thread (qm/server/group_commit.py); the loop runs only reads by key (measured): one
key each, or a stream's ids 16 a statement, yielding between two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import operator
import os
import sqlite3
import threading
import time
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from qm.errors import IdempotencyKeyTaken
from qm.frozen import evolve, from_values
from qm.messages import TaskEvent
from qm.os_thread_names import name_this_thread
from qm.priority import DEFAULT_PRIORITY
from qm.server.group_callback import callback_task
from qm.server.group_commit import GroupCommit, TransactionObserver
from qm.server.progress import next_progress
from qm.server.store_api import DeadLetter, GroupRecord, ScheduleRecord, TaskRecord
from qm.states import TaskState, supersedes

log = logging.getLogger(__name__)

#: Rows one retention or purge batch deletes: one short transaction on the event loop.
DELETE_BATCH_ROWS = 1000
#: Seconds between two WAL checkpoints on the checkpoint thread.
CHECKPOINT_INTERVAL_S = 1.0
#: WAL pages after which a commit on the serving connection checkpoints by itself: SQLite's
#: default while no checkpoint thread runs, this backstop (32 MiB of 4 KiB pages) while one
#: does; that checkpoint copies only what the thread has not, and lets the WAL start over.
SQLITE_AUTOCHECKPOINT_PAGES = 1000
BACKSTOP_AUTOCHECKPOINT_PAGES = 8192
#: Size the WAL file is cut back to when it is reset after a complete checkpoint.
WAL_SIZE_LIMIT_BYTES = 32 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    queue       TEXT NOT NULL,
    codec       TEXT NOT NULL,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    result      BLOB,
    error       TEXT NOT NULL DEFAULT '',
    worker      TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    updated_at  REAL NOT NULL,
    timeout_s   REAL NOT NULL DEFAULT 0,
    memory_limit_mb INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT NOT NULL DEFAULT '',
    max_retries INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    starts      INTEGER NOT NULL DEFAULT 0,
    request_digest TEXT NOT NULL DEFAULT '',
    progress    REAL NOT NULL DEFAULT 0,
    progress_message TEXT NOT NULL DEFAULT '',
    progress_detail_json TEXT NOT NULL DEFAULT '',
    progress_at REAL,
    schedule_id TEXT NOT NULL DEFAULT '',
    group_id    TEXT NOT NULL DEFAULT '',
    group_index INTEGER NOT NULL DEFAULT -1,
    cpus        INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS unconfirmed (
    task_id TEXT PRIMARY KEY,
    queue   TEXT NOT NULL,
    body    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    task_id TEXT PRIMARY KEY,
    body    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    task_id  TEXT PRIMARY KEY,
    type     TEXT NOT NULL,
    queue    TEXT NOT NULL,
    state    INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    error    TEXT NOT NULL,
    body     BLOB NOT NULL,
    dead_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS task_groups (
    group_id         TEXT PRIMARY KEY,
    members          INTEGER NOT NULL,
    finished         INTEGER NOT NULL,
    created_at       REAL NOT NULL,
    completed_at     REAL,
    callback_task_id TEXT NOT NULL,
    callback_queue   TEXT NOT NULL,
    callback_body    BLOB NOT NULL,
    idempotency_key  TEXT NOT NULL,
    request_digest   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    schedule_id  TEXT PRIMARY KEY,
    cron         TEXT NOT NULL,
    every_s      REAL NOT NULL,
    timezone     TEXT NOT NULL,
    missed       TEXT NOT NULL,
    type         TEXT NOT NULL,
    queue        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    options_json TEXT NOT NULL,
    created_at   REAL NOT NULL,
    next_fire_at REAL NOT NULL,
    last_tick_at REAL,
    last_task_id TEXT NOT NULL DEFAULT '',
    fires        INTEGER NOT NULL DEFAULT 0,
    missed_ticks INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT ''
)
"""
_INDEXES = f"""
CREATE INDEX IF NOT EXISTS tasks_by_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS tasks_by_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS retrying_by_due ON tasks (queue, next_attempt_at) WHERE state = {int(TaskState.RETRYING)};
CREATE INDEX IF NOT EXISTS running_by_deadline ON tasks (started_at + timeout_s) WHERE state = {int(TaskState.RUNNING)};
CREATE INDEX IF NOT EXISTS scheduled_by_due ON tasks (queue, next_attempt_at) WHERE state = {int(TaskState.SCHEDULED)};
CREATE INDEX IF NOT EXISTS queued_by_queue ON tasks (queue, created_at) WHERE state = {int(TaskState.QUEUED)};
CREATE INDEX IF NOT EXISTS dead_letters_by_dead_at ON dead_letters (dead_at);
CREATE INDEX IF NOT EXISTS schedules_by_next_fire_at ON schedules (next_fire_at);
CREATE INDEX IF NOT EXISTS tasks_by_group ON tasks (group_id, group_index) WHERE group_id != '';
CREATE INDEX IF NOT EXISTS task_groups_by_idempotency_key ON task_groups (idempotency_key) WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS task_groups_by_completed_at ON task_groups (completed_at) WHERE completed_at IS NOT NULL;
"""
#: Tables whose rows `counters` keeps count of (its row names are the table names).
_COUNTED_TABLES = ("tasks", "dead_letters", "schedules")


#: Columns added after the first release, with their declarations.
_ADDED_COLUMNS = {
    "timeout_s": "REAL NOT NULL DEFAULT 0",
    "memory_limit_mb": "INTEGER NOT NULL DEFAULT 0",
    "idempotency_key": "TEXT NOT NULL DEFAULT ''",
    "max_retries": "INTEGER NOT NULL DEFAULT 0",
    "next_attempt_at": "REAL",
    "starts": "INTEGER NOT NULL DEFAULT 0",
    "request_digest": "TEXT NOT NULL DEFAULT ''",
    "progress": "REAL NOT NULL DEFAULT 0",
    "progress_message": "TEXT NOT NULL DEFAULT ''",
    "progress_detail_json": "TEXT NOT NULL DEFAULT ''",
    "progress_at": "REAL",
    "priority": f"INTEGER NOT NULL DEFAULT {DEFAULT_PRIORITY}",
    "schedule_id": "TEXT NOT NULL DEFAULT ''",
    "group_id": "TEXT NOT NULL DEFAULT ''",
    "group_index": "INTEGER NOT NULL DEFAULT -1",
    "cpus": "INTEGER NOT NULL DEFAULT 1",
}


_COLUMNS = [field.name for field in dataclasses.fields(TaskRecord)]
_DEAD_COLUMNS = [field.name for field in dataclasses.fields(DeadLetter)]
_SCHEDULE_COLUMNS = [field.name for field in dataclasses.fields(ScheduleRecord)]
_GROUP_COLUMNS = [field.name for field in dataclasses.fields(GroupRecord)]
#: A task record's column values in _COLUMNS order (dataclasses.astuple deep-copies every
#: field: a tenth of the writer thread's time under submit_many).
_task_row: Callable[[TaskRecord], tuple] = operator.attrgetter(*_COLUMNS)
_STATE_INDEX = _COLUMNS.index("state")


class LoopObserver(TransactionObserver, Protocol):
    def store_loop_call(self, call: str, seconds: float) -> None:
        """A store call ran `seconds` on the event loop (a point read; writes only hand over)."""


class Store:
    """Task records in one SQLite file (implements qm.server.store_api.TaskStore).

    Writes run on the writer thread, grouped into shared transactions
    (qm/server/group_commit.py); a confirm mark rides with the next one. Point reads by
    key (a task, an idempotency key, a message, a counter) run on the event loop through a
    connection of their own: one index search, measured (`LoopObserver.store_loop_call`,
    the `qm_server_store_loop_seconds` histogram); `get_many` is one statement per 16
    ids there, yielding between two. Range reads run on the writer thread.
    Once started, a checkpoint thread has a third connection.
    """

    #: The sqlite3.Connection subclass every connection of the store is made with (a test
    #: records the statements the store runs through it).
    connection_factory: type[sqlite3.Connection] = sqlite3.Connection

    def __init__(self, path: str | os.PathLike, observer: LoopObserver | None = None) -> None:
        self.path = os.fspath(path)
        if self.path != ":memory:":  # owner only; SQLite gives its -wal and -shm files the same mode
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._observer = observer
        self._db = self._connect()  # the event loop's: schema at opening, then point reads
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._db.executescript(_INDEXES)
        self._keep_counts()
        self._writes: GroupCommit[str] = GroupCommit(self._connect, _write_confirms, observer)
        self._checkpointer: _Checkpointer | None = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, factory=self.connection_factory)
        db.execute("PRAGMA synchronous=NORMAL")
        # A REPLACE that deletes a row fires the delete triggers too: counts stay right
        # whatever form a statement takes.
        db.execute("PRAGMA recursive_triggers=ON")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        # Each write runs in a SAVEPOINT (qm/server/group_commit.py), whose undo copies of
        # the pages it changes go to a sub-journal: a temp file once one work changed more
        # than 64 KiB (an events batch), then two pwrite calls per page for the rest of the
        # transaction. In memory, it is freed at each RELEASE.
        db.execute("PRAGMA temp_store=MEMORY")
        return db

    def _keep_counts(self) -> None:
        """Triggers keep each counted table's size in `counters`, in the transaction that
        changes it. A table without its counter yet (a new store, or one written by an older
        version) is counted here, once: the only COUNT(*) the store ever runs."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            present = {name for (name,) in self._db.execute("SELECT name FROM counters")}
            for table in _COUNTED_TABLES:
                if table not in present:
                    self._db.execute(f"INSERT INTO counters (name, value) SELECT '{table}', COUNT(*) FROM {table}")
                for event, change in (("INSERT", "+ 1"), ("DELETE", "- 1")):
                    self._db.execute(
                        f"CREATE TRIGGER IF NOT EXISTS {table}_count_{event.lower()} "
                        f"AFTER {event} ON {table} "
                        f"BEGIN UPDATE counters SET value = value {change} WHERE name = '{table}'; END"
                    )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _add_missing_columns(self) -> None:
        """Upgrade a store written by an older version (columns are only ever added)."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name, declaration in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")

    async def close(self) -> None:
        """Write what is pending (confirm marks too), then close every connection."""
        await self._writes.close()
        self.stop_checkpoints()
        self._db.close()

    # -- WAL size ----------------------------------------------------------------------

    def start_checkpoints(self, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        """Checkpoint the WAL every interval_s on a thread with its own connection, so the
        writer's commits no longer copy the WAL into the database. Under sustained
        writes a passive checkpoint never finds the WAL completely copied (commits keep
        coming), so the WAL starts over when the writer's own checkpoint runs at the
        backstop; by then the thread has copied all but the last interval's frames.
        Stopped by close()."""
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self._connect, interval_s)
            self._set_autocheckpoint(BACKSTOP_AUTOCHECKPOINT_PAGES)

    def stop_checkpoints(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
            self._set_autocheckpoint(SQLITE_AUTOCHECKPOINT_PAGES)

    def _set_autocheckpoint(self, pages: int) -> None:
        """On every connection that commits (the writer's; the loop's opens the store)."""
        self._db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        if not self._writes.closed:
            self._writes.call(lambda db: db.execute(f"PRAGMA wal_autocheckpoint={pages}"))

    def checkpoint(self) -> tuple[int, int]:
        """A passive checkpoint now, on the loop's connection: (WAL frames, frames checkpointed)."""
        return _passive_checkpoint(self._db)

    # -- point reads on the event loop -------------------------------------------------

    def _read(self, call: str, query: str, params: tuple) -> list[tuple]:
        """One indexed look-up on the loop's connection, timed for the loop-time histogram."""
        started = time.perf_counter()
        rows = self._db.execute(query, params).fetchall()
        if self._observer is not None:
            self._observer.store_loop_call(call, time.perf_counter() - started)
        return rows

    async def get(self, task_id: str) -> TaskRecord | None:
        rows = self._read("get", _SELECT_TASK_BY_ID, (task_id,))
        return _record(rows[0]) if rows else None

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """A look-up by primary key per `_IDS_PER_LOOP_READ` ids, the loop free between two."""
        records: list[TaskRecord] = []
        for start in range(0, len(task_ids), _IDS_PER_LOOP_READ):
            if start:
                await asyncio.sleep(0)  # let submits and events in between two look-ups
            chunk = tuple(task_ids[start : start + _IDS_PER_LOOP_READ])
            records += map(_record, self._read("get_many", _select_tasks_in(len(chunk)), chunk))
        return records

    async def find_by_idempotency_key(self, key: str) -> TaskRecord | None:
        rows = self._read("find_by_idempotency_key", _SELECT_TASK_BY_KEY, (key,))
        return _record(rows[0]) if rows else None

    async def message(self, task_id: str) -> bytes | None:
        """The task's first message as submitted here (None once final, or if submitted elsewhere)."""
        rows = self._read("message", "SELECT body FROM messages WHERE task_id = ?", (task_id,))
        return rows[0][0] if rows else None

    async def get_group(self, group_id: str) -> GroupRecord | None:
        rows = self._read("get_group", _SELECT_GROUP_BY_ID, (group_id,))
        return GroupRecord(*rows[0]) if rows else None

    async def find_group_by_idempotency_key(self, key: str) -> GroupRecord | None:
        rows = self._read("find_group_by_idempotency_key", _SELECT_GROUP_BY_KEY, (key,))
        return GroupRecord(*rows[0]) if rows else None

    async def group_members(self, group_id: str) -> list[tuple[str, TaskState]]:
        """(task id, state) of the members in order: one range of the group index (at most
        server.max_batch_items rows)."""
        rows = self._read("group_members", _SELECT_GROUP_MEMBERS, (group_id,))
        return [(task_id, TaskState(state)) for task_id, state in rows]

    async def count(self) -> int:
        """Tasks in the store (kept by triggers: no COUNT(*))."""
        return self._read("count", _SELECT_COUNTER, ("tasks",))[0][0]

    async def count_dead_letters(self) -> int:
        """Dead letters in the store (kept by triggers: no COUNT(*))."""
        return self._read("count_dead_letters", _SELECT_COUNTER, ("dead_letters",))[0][0]

    # -- accepted but not yet confirmed by RabbitMQ ---------------------------------------

    async def insert_unconfirmed(self, record: TaskRecord, queue: str, body: bytes) -> None:
        """Store a task with the message that still has to reach RabbitMQ, committed when
        this returns; the message is also kept until the task is final (the reconciler's copy).
        A key a stored task already has: IdempotencyKeyTaken, nothing stored (checked in the
        transaction, on the writer thread: the submit path makes no look-up of its own)."""

        def write(db: sqlite3.Connection) -> None:
            key = record.idempotency_key
            if key and db.execute(_KEY_TAKEN, (key,)).fetchone() is not None:
                raise IdempotencyKeyTaken(key)
            _insert(db, record)
            db.execute("INSERT INTO unconfirmed (task_id, queue, body) VALUES (?, ?, ?)", (record.task_id, queue, body))
            db.execute("INSERT OR REPLACE INTO messages (task_id, body) VALUES (?, ?)", (record.task_id, body))

        await self._writes.write(write)

    async def confirm(self, task_id: str) -> None:
        """RabbitMQ confirmed the task's message: nothing left to resend. Written with the
        next transaction (no transaction of its own); `unconfirmed` leaves it out from now."""
        self._writes.defer(task_id)

    async def unconfirmed(self, task_id: str | None = None) -> list[tuple[str, str, bytes]]:
        """(task id, queue, message body) of tasks whose publish was never confirmed."""
        query = "SELECT task_id, queue, body FROM unconfirmed"
        if task_id is None:
            rows = await self._writes.write(lambda db: db.execute(query).fetchall())
        else:
            rows = self._read("unconfirmed", f"{query} WHERE task_id = ?", (task_id,))
        return [row for row in rows if not self._writes.unwritten(row[0])]

    async def insert(self, record: TaskRecord) -> None:
        await self._writes.write(lambda db: _insert(db, record))

    async def insert_group(self, group: GroupRecord, members: list[tuple[TaskRecord, str, bytes]]) -> None:
        """The group row and every member, unconfirmed, in one transaction."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(_INSERT_GROUP, dataclasses.astuple(group))
            placeholders = ", ".join("?" for _ in _COLUMNS)
            db.executemany(
                f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                [_task_row(record) for record, _queue, _body in members],
            )
            db.executemany(
                "INSERT INTO unconfirmed (task_id, queue, body) VALUES (?, ?, ?)",
                [(record.task_id, queue, body) for record, queue, body in members],
            )
            db.executemany(
                "INSERT OR REPLACE INTO messages (task_id, body) VALUES (?, ?)",
                [(record.task_id, body) for record, _queue, body in members],
            )

        await self._writes.write(write)

    async def delete(self, task_id: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            db.execute("DELETE FROM unconfirmed WHERE task_id = ?", (task_id,))
            db.execute("DELETE FROM messages WHERE task_id = ?", (task_id,))

        await self._writes.write(write)

    # -- the reconciler's look-ups (each an indexed range over unfinished tasks) ---------

    async def overdue_retries(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """RETRYING tasks of a logical queue whose next attempt was due before `due_before_s`."""
        return await self._due(TaskState.RETRYING, queue, due_before_s, limit)

    async def overdue_scheduled(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """SCHEDULED tasks of a logical queue that were due before `due_before_s` (never started)."""
        return await self._due(TaskState.SCHEDULED, queue, due_before_s, limit)

    async def _due(self, state: TaskState, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """Tasks in `state` of a queue whose next_attempt_at passed, by due time (a partial index each)."""
        return await self._select(
            f"WHERE state = {int(state)} AND queue = ? AND next_attempt_at < ? ORDER BY next_attempt_at LIMIT ?",
            (queue, due_before_s, limit),
        )

    async def overdue_runs(self, deadline_before_s: float, limit: int) -> list[TaskRecord]:
        """RUNNING tasks whose time limit ran out before `deadline_before_s`, oldest first."""
        return await self._select(
            f"WHERE state = {int(TaskState.RUNNING)} AND started_at + timeout_s < ? "
            "AND timeout_s > 0 ORDER BY started_at + timeout_s LIMIT ?",
            (deadline_before_s, limit),
        )

    async def queued_before(self, queue: str, created_before_s: float, limit: int) -> list[TaskRecord]:
        """QUEUED tasks of a logical queue created before `created_before_s`, oldest first."""
        return await self._select(
            f"WHERE state = {int(TaskState.QUEUED)} AND queue = ? AND created_at < ? ORDER BY created_at LIMIT ?",
            (queue, created_before_s, limit),
        )

    async def claim_reconcile(self, every_s: float) -> bool:
        """Always: a SQLite store has one server."""
        return True

    async def _select(self, where: str, params: tuple) -> list[TaskRecord]:
        """Up to LIMIT records, read on the writer thread (too many rows for the loop)."""
        rows = await self._writes.write(
            lambda db: db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks {where}", params).fetchall()
        )
        return [_record(row) for row in rows]

    async def purge_finished(self, before_s: float, limit: int = DELETE_BATCH_ROWS) -> int:
        """Delete up to `limit` tasks that finished before `before_s` (epoch seconds), found
        through the finished_at index; return how many. Call again while it returns `limit`
        (qm.server.maintenance does, letting other writes commit in between)."""

        def delete(db: sqlite3.Connection) -> int:
            # Groups go with their tasks (their own batch: a few rows per thousand tasks).
            db.execute(
                "DELETE FROM task_groups WHERE rowid IN (SELECT rowid FROM task_groups "
                "WHERE completed_at IS NOT NULL AND completed_at < ? LIMIT ?)",
                (before_s, limit),
            )
            return db.execute(
                "DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks "
                "WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?)",
                (before_s, limit),
            ).rowcount

        return await self._writes.write(delete)

    # -- dead letters ------------------------------------------------------------------

    async def add_dead_letter(self, dead: DeadLetter) -> None:
        await self._writes.write(
            lambda db: db.execute(_upsert_statement("dead_letters", _DEAD_COLUMNS), dataclasses.astuple(dead))
        )

    async def dead_letters(
        self, limit: int, task_ids: list[str] | None = None, bodies: bool = True
    ) -> tuple[list[DeadLetter], int]:
        """Dead letters, oldest first (these ids only, if given), and how many there are in all;
        bodies=False leaves the message bodies unread (b"": listing needs none)."""
        columns = _DEAD_COLUMNS if bodies else [c if c != "body" else "x'' AS body" for c in _DEAD_COLUMNS]
        query = f"SELECT {', '.join(columns)} FROM dead_letters"
        params: tuple = ()
        if task_ids is not None:
            query += f" WHERE task_id IN ({', '.join('?' for _ in task_ids)})"
            params = tuple(task_ids)

        def read(db: sqlite3.Connection) -> tuple[list[DeadLetter], int]:
            rows = db.execute(f"{query} ORDER BY dead_at LIMIT ?", (*params, limit)).fetchall()
            return [_dead_letter(row) for row in rows], db.execute(_SELECT_COUNTER, ("dead_letters",)).fetchone()[0]

        return await self._writes.write(read)

    async def remove_dead_letters(
        self, task_ids: list[str] | None = None, limit: int = DELETE_BATCH_ROWS, dead_before_s: float = math.inf
    ) -> int:
        """Remove these dead letters, or if None up to `limit` of the oldest (those dead
        before `dead_before_s` only: retention; call again while it returns `limit`);
        return how many went."""
        if task_ids is None:
            return await self._writes.write(
                lambda db: (
                    db.execute(
                        "DELETE FROM dead_letters WHERE rowid IN (SELECT rowid FROM dead_letters "
                        "WHERE dead_at < ? ORDER BY dead_at LIMIT ?)",
                        (dead_before_s, limit),
                    ).rowcount
                )
            )
        return await self._writes.write(
            lambda db: (
                db.execute(
                    f"DELETE FROM dead_letters WHERE task_id IN ({', '.join('?' for _ in task_ids)})", tuple(task_ids)
                ).rowcount
            )
        )

    async def apply(self, events: Iterable[TaskEvent], codec_of: dict[str, str]) -> list[TaskRecord]:
        """Apply events, committed when this returns (in a transaction shared with other
        writes; a batch that fails changes nothing); return every record change, in order.

        Duplicates and stale events change nothing (see qm.states.supersedes). An event
        for a task this replica never saw (submitted through another server) creates it.
        """
        return await self._writes.write(lambda db: _apply(db, events, codec_of))

    # -- periodic schedules ------------------------------------------------------------

    async def add_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Store a new schedule; an id already taken changes nothing: the stored one is returned."""

        def write(db: sqlite3.Connection) -> ScheduleRecord:
            placeholders = ", ".join("?" for _ in _SCHEDULE_COLUMNS)
            db.execute(
                f"INSERT INTO schedules ({', '.join(_SCHEDULE_COLUMNS)}) VALUES ({placeholders}) "
                "ON CONFLICT (schedule_id) DO NOTHING",
                dataclasses.astuple(schedule),
            )
            return _schedule(
                db.execute(f"{_SELECT_SCHEDULES} WHERE schedule_id = ?", (schedule.schedule_id,)).fetchone()
            )

        return await self._writes.write(write)

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        rows = self._read("get_schedule", f"{_SELECT_SCHEDULES} WHERE schedule_id = ?", (schedule_id,))
        return _schedule(rows[0]) if rows else None

    async def list_schedules(self, after_id: str, limit: int) -> list[ScheduleRecord]:
        """By id, after `after_id` (a walk of the primary key that stops at the limit)."""
        rows = await self._writes.write(
            lambda db: db.execute(
                f"{_SELECT_SCHEDULES} WHERE schedule_id > ? ORDER BY schedule_id LIMIT ?", (after_id, limit)
            ).fetchall()
        )
        return [_schedule(row) for row in rows]

    async def remove_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        rows = await self._writes.write(
            lambda db: db.execute(
                f"DELETE FROM schedules WHERE schedule_id = ? RETURNING {', '.join(_SCHEDULE_COLUMNS)}", (schedule_id,)
            ).fetchall()
        )
        return _schedule(rows[0]) if rows else None

    async def count_schedules(self) -> int:
        return self._read("count_schedules", _SELECT_COUNTER, ("schedules",))[0][0]

    async def due_schedules(self, now_s: float, limit: int) -> list[ScheduleRecord]:
        """Earliest first, through the next_fire_at index."""
        rows = await self._writes.write(
            lambda db: db.execute(
                f"{_SELECT_SCHEDULES} WHERE next_fire_at <= ? ORDER BY next_fire_at LIMIT ?", (now_s, limit)
            ).fetchall()
        )
        return [_schedule(row) for row in rows]

    async def next_schedule_at(self) -> float | None:
        rows = self._read("next_schedule_at", "SELECT next_fire_at FROM schedules ORDER BY next_fire_at LIMIT 1", ())
        return rows[0][0] if rows else None

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
        """The compare-and-set of the schedule's next tick and the fired task's rows, in one
        write of the writer's transaction (a SAVEPOINT: all or nothing)."""

        def write(db: sqlite3.Connection) -> bool:
            claimed = db.execute(
                _CLAIM_TICK,
                (
                    next_s,
                    tick_s,
                    fired[0].task_id if fired else None,
                    1 if fired else 0,
                    missed,
                    error,
                    schedule_id,
                    due_s,
                ),
            ).rowcount
            if claimed != 1:
                return False
            if fired is not None:
                record, queue, body = fired
                _insert(db, record)
                db.execute(
                    "INSERT INTO unconfirmed (task_id, queue, body) VALUES (?, ?, ?)", (record.task_id, queue, body)
                )
                db.execute("INSERT OR REPLACE INTO messages (task_id, body) VALUES (?, ?)", (record.task_id, body))
            return True

        return await self._writes.write(write)


_SELECT_SCHEDULES = f"SELECT {', '.join(_SCHEDULE_COLUMNS)} FROM schedules"
_SELECT_TASK_BY_ID = f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE task_id = ?"
# The index holds only non-empty keys; SQLite uses a partial index only when the query
# itself says so (it cannot prove `= ?` implies `!= ''`): without the second condition this
# is a scan of every task.
_KEY_TAKEN = "SELECT 1 FROM tasks WHERE idempotency_key = ? AND idempotency_key != ''"
_SELECT_TASK_BY_KEY = f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE idempotency_key = ? AND idempotency_key != ''"
_SELECT_COUNTER = "SELECT value FROM counters WHERE name = ?"
_INSERT_GROUP = (
    f"INSERT INTO task_groups ({', '.join(_GROUP_COLUMNS)}) VALUES ({', '.join('?' for _ in _GROUP_COLUMNS)})"
)
_SELECT_GROUP_BY_ID = f"SELECT {', '.join(_GROUP_COLUMNS)} FROM task_groups WHERE group_id = ?"
_SELECT_GROUP_BY_KEY = (
    f"SELECT {', '.join(_GROUP_COLUMNS)} FROM task_groups WHERE idempotency_key = ? AND idempotency_key != ''"
)
# `group_id != ''` lets SQLite use the partial index (see _SELECT_TASK_BY_KEY).
_SELECT_GROUP_MEMBERS = (
    "SELECT task_id, state FROM tasks WHERE group_id = ? AND group_id != '' AND group_index >= 0 ORDER BY group_index"
)


#: The compare-and-set of a schedule's tick (params: next, tick, task id, fired 0/1, missed,
#: error, schedule id, the tick expected): a tick that fired nothing keeps the last task.
_CLAIM_TICK = (
    "UPDATE schedules SET next_fire_at = ?, last_tick_at = coalesce(?, last_tick_at), "
    "last_task_id = coalesce(?, last_task_id), fires = fires + ?, missed_ticks = missed_ticks + ?, "
    "last_error = ? WHERE schedule_id = ? AND next_fire_at = ?"
)


def _write_confirms(db: sqlite3.Connection, task_ids: list[str]) -> None:
    """The deferred confirm marks: their messages reached RabbitMQ."""
    db.executemany("DELETE FROM unconfirmed WHERE task_id = ?", [(task_id,) for task_id in task_ids])


def _insert(db: sqlite3.Connection, record: TaskRecord) -> None:
    placeholders = ", ".join("?" for _ in _COLUMNS)
    db.execute(f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({placeholders})", _task_row(record))


def _get(db: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    row = db.execute(_SELECT_TASK_BY_ID, (task_id,)).fetchone()
    return _record(row) if row is not None else None


#: Ids per look-up of a batch's tasks (SQLite allows 32,766 parameters since 3.32).
_IDS_PER_SELECT = 500
#: Ids per look-up on the event loop (Store.get_many), so that each statement stays a
#: short blocking call: 16 ids took about 70 us of SQLite (p50; 20 ids 87 us, p99 157;
#: 100 ids 390 us) on the 2-core test machine, one point read 12 us.
_IDS_PER_LOOP_READ = 16


def _select_tasks_in(count: int) -> str:
    return f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE task_id IN ({', '.join('?' * count)})"


def _get_many(db: sqlite3.Connection, task_ids: set[str]) -> dict[str, TaskRecord]:
    """The stored records of these ids (absent ones left out), a few statements per batch."""
    ids = list(task_ids)
    found: dict[str, TaskRecord] = {}
    for start in range(0, len(ids), _IDS_PER_SELECT):
        chunk = ids[start : start + _IDS_PER_SELECT]
        for row in db.execute(_select_tasks_in(len(chunk)), chunk):
            record = _record(row)
            found[record.task_id] = record
    return found


def _apply(db: sqlite3.Connection, events: Iterable[TaskEvent], codec_of: dict[str, str]) -> list[TaskRecord]:
    """Store.apply's work, inside the writer's transaction."""
    events = list(events)
    known = _get_many(db, {event.task_id for event in events})
    latest, stored, changes = fold_events(events, known.get, codec_of)
    updates: dict[tuple[str, ...], list[tuple]] = {}  # changed columns -> rows: one executemany each
    finished = []
    for record in latest.values():
        before = stored.get(record.task_id)
        if before is None:
            _insert(db, record)
        else:
            _changed_row(before, record, updates)
        if record.state.terminal:
            finished.append((record.task_id,))
    for columns, rows in updates.items():
        db.executemany(f"UPDATE tasks SET {', '.join(f'{column} = ?' for column in columns)} WHERE task_id = ?", rows)
    if finished:
        db.executemany("DELETE FROM messages WHERE task_id = ?", finished)
    for group_id, count in newly_finished(latest, stored).items():
        callback = _count_finished(db, group_id, count, codec_of)
        if callback is not None:
            changes.append(callback)
    return changes


def _count_finished(db: sqlite3.Connection, group_id: str, count: int, codec_of: dict[str, str]) -> TaskRecord | None:
    """Count `count` more finished members; the update that counts the last one (one row,
    in this transaction: once) stores the callback, unconfirmed, and returns its record."""
    now = time.time()
    row = db.execute(
        "UPDATE task_groups SET finished = finished + ?, "
        "completed_at = CASE WHEN finished + ? >= members THEN ? ELSE NULL END "
        "WHERE group_id = ? AND completed_at IS NULL RETURNING completed_at",
        (count, count, now, group_id),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    group = GroupRecord(*db.execute(_SELECT_GROUP_BY_ID, (group_id,)).fetchone())
    if not group.callback_body:
        return None
    members = [
        _record(member)
        for member in db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE group_id = ? AND group_id != '' AND group_index >= 0 "
            "ORDER BY group_index",
            (group_id,),
        )
    ]
    record, queue, body = callback_task(group, members, codec_of, now)
    _insert(db, record)
    db.execute("INSERT INTO unconfirmed (task_id, queue, body) VALUES (?, ?, ?)", (record.task_id, queue, body))
    db.execute("INSERT OR REPLACE INTO messages (task_id, body) VALUES (?, ?)", (record.task_id, body))
    return record


def _changed_row(before: TaskRecord, after: TaskRecord, updates: dict[tuple[str, ...], list[tuple]]) -> None:
    """Add the task's UPDATE row under the columns that changed (none: nothing). Only
    those are written: an index whose column is not set is not touched (setting the
    idempotency key to itself would rewrite its entry in that index for every event)."""
    old, new = before.__dict__, after.__dict__
    changed = tuple(column for column in _COLUMNS if old[column] != new[column])
    if changed:
        updates.setdefault(changed, []).append((*(new[column] for column in changed), after.task_id))


def fold_events(
    events: Iterable[TaskEvent], load: Callable[[str], TaskRecord | None], codec_of: dict[str, str]
) -> tuple[dict[str, TaskRecord], dict[str, TaskRecord], list[TaskRecord]]:
    """Fold a batch of events into task records (every store applies events this way).

    `load(task_id)` gives a task's stored record (None: unknown here, the event creates
    it). Returns (each changed task's record after the batch, the stored records it read,
    every change in order: intermediate states too, so followers see RUNNING).
    Duplicates and stale events change nothing (qm.states.supersedes).
    """
    latest: dict[str, TaskRecord] = {}
    stored: dict[str, TaskRecord] = {}  # as they were in the store before this batch
    changes: list[TaskRecord] = []
    for event in with_unannounced_starts(events):
        current = latest.get(event.task_id) or stored.get(event.task_id)
        if current is None:
            current = load(event.task_id)
            if current is not None:
                stored[event.task_id] = current
        if event.progress is not None:  # advisory: never a state change, never a start
            updated = next_progress(current, event)
            if updated is not None:
                latest[event.task_id] = updated
                changes.append(updated)
            continue
        updated = _next_record(current, event, codec_of.get(event.type, "text"))
        if event.state is TaskState.RUNNING and _is_new_start(current, event):
            started = updated or current  # every start counts, a redelivered one too
            assert started is not None  # _next_record makes a record for a task's first start
            if not started.state.terminal:  # a redelivery: the worker running it now
                # Starts count per attempt: a task that fails and retries normally is
                # never mistaken for one that takes its workers down.
                new_attempt = current is None or event.attempt > current.attempts
                updated = evolve(
                    started,
                    starts=1 if new_attempt else started.starts + 1,
                    started_at=event.at_s,
                    updated_at=event.at_s,
                    worker=event.worker or started.worker,
                    # a run starts from nothing: the progress of an earlier one is gone
                    progress=0.0,
                    progress_message="",
                    progress_detail_json="",
                    progress_at=None,
                )
        if updated is not None:
            latest[event.task_id] = updated
            changes.append(updated)
    return latest, stored, changes


def with_unannounced_starts(events: Iterable[TaskEvent]) -> Iterator[TaskEvent]:
    """The events, each outcome that carries its run's start (no RUNNING event announced a
    run shorter than the worker's running_event_delay_s) preceded by that start: it counts,
    and followers see RUNNING, as if the worker had published it."""
    for event in events:
        if event.started_at_s is not None and event.progress is None and event.state is not TaskState.RUNNING:
            yield evolve(
                event,
                state=TaskState.RUNNING,
                result=b"",
                error="",
                at_s=event.started_at_s,
                next_attempt_at_s=None,
                started_at_s=None,
            )
        yield event


def newly_finished(latest: dict[str, TaskRecord], stored: dict[str, TaskRecord]) -> dict[str, int]:
    """Group id → how many of its members reached a terminal state in this batch (a member
    already terminal before it is not counted again: terminal states are final)."""
    counts: dict[str, int] = {}
    for record in latest.values():
        before = stored.get(record.task_id)
        if record.group_member and record.state.terminal and (before is None or not before.state.terminal):
            counts[record.group_id] = counts.get(record.group_id, 0) + 1
    return counts


def _upsert_statement(table: str, columns: list[str]) -> str:
    """Insert a row, or update the one with its key (the first column) in place: unlike
    INSERT OR REPLACE, the row keeps its place and only changed index entries are rewritten."""
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns[1:])
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({columns[0]}) DO UPDATE SET {updates}"
    )


def _passive_checkpoint(db: sqlite3.Connection) -> tuple[int, int]:
    """Copy what it can from the WAL into the database file without waiting for anyone;
    once all of it is copied, the next commit starts the WAL over (and cuts the file back to
    WAL_SIZE_LIMIT_BYTES). Returns (frames in the WAL, frames copied)."""
    _busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return frames, copied


class _Checkpointer:
    """A thread checkpointing the store's WAL every interval_s through its own connection.

    PASSIVE never blocks the serving connection: its commits go on appending to the WAL
    while frames are copied, and never wait for this thread (TRUNCATE or RESTART would make
    them wait, on the event loop)."""

    def __init__(self, connect, interval_s: float) -> None:
        self._connect = connect
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_this_thread()
        db = self._connect()
        try:
            while not self._stop.wait(self._interval_s):
                try:
                    _passive_checkpoint(db)
                except sqlite3.Error as exc:  # e.g. the disk is full: the backstop still bounds the WAL
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _record(row: tuple) -> TaskRecord:
    values = list(row)
    state = values[_STATE_INDEX]  # its wire number, as stored
    values[_STATE_INDEX] = state if isinstance(state, TaskState) else TaskState.of_number(state)
    return from_values(TaskRecord, values)


def _schedule(row: tuple) -> ScheduleRecord:
    return ScheduleRecord(*row)


def _dead_letter(row: tuple) -> DeadLetter:
    values = dict(zip(_DEAD_COLUMNS, row, strict=True))
    values["state"] = TaskState(values["state"])
    return DeadLetter(**values)


def _is_new_start(current: TaskRecord | None, event: TaskEvent) -> bool:
    """A RUNNING event later than the last start seen (a replayed copy of one is not)."""
    return current is None or current.started_at is None or event.at_s > current.started_at


def _next_record(current: TaskRecord | None, event: TaskEvent, codec: str) -> TaskRecord | None:
    """The record after the event, or None when the event changes nothing."""
    if current is None:
        current = TaskRecord.queued(event.task_id, event.type, event.queue, codec, event.at_s)
    elif not supersedes(current.state, current.attempts, event.state, event.attempt):
        return None
    terminal = event.state.terminal
    return evolve(
        current,
        state=event.state,
        attempts=max(current.attempts, event.attempt),
        worker=event.worker or current.worker,
        result=event.result if event.state is TaskState.SUCCEEDED else current.result,
        error=event.error if terminal or event.state is TaskState.RETRYING else current.error,
        started_at=event.at_s if event.state is TaskState.RUNNING else current.started_at,
        finished_at=event.at_s if terminal else current.finished_at,
        updated_at=event.at_s,
        timeout_s=event.timeout_s or current.timeout_s,
        memory_limit_mb=event.memory_limit_mb or current.memory_limit_mb,
        next_attempt_at=event.next_attempt_at_s if event.state is TaskState.RETRYING else None,
    )
