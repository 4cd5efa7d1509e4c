"""SQLite store of task state: this server's replica, fed by its own events queue.

WAL mode with synchronous=NORMAL: a crash may lose the last commits, never corrupt the
file, and anything lost is replayed from the durable events queue (events are acked
only after the transaction that applied them committed).
"""
from __future__ import annotations

import dataclasses
import os
import sqlite3
from typing import Iterable

from qm.messages import TaskEvent
from qm.states import TaskState, supersedes

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
    starts      INTEGER NOT NULL DEFAULT 0
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
)
"""
_INDEXES = f"""
CREATE INDEX IF NOT EXISTS tasks_by_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS tasks_by_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS retrying_by_due ON tasks (queue, next_attempt_at) WHERE state = {int(TaskState.RETRYING)};
CREATE INDEX IF NOT EXISTS running_by_deadline ON tasks (started_at + timeout_s) WHERE state = {int(TaskState.RUNNING)};
CREATE INDEX IF NOT EXISTS queued_by_queue ON tasks (queue, created_at) WHERE state = {int(TaskState.QUEUED)};
"""


#: Columns added after the first release, with their declarations.
_ADDED_COLUMNS = {"timeout_s": "REAL NOT NULL DEFAULT 0", "memory_limit_mb": "INTEGER NOT NULL DEFAULT 0",
                  "idempotency_key": "TEXT NOT NULL DEFAULT ''", "max_retries": "INTEGER NOT NULL DEFAULT 0",
                  "next_attempt_at": "REAL", "starts": "INTEGER NOT NULL DEFAULT 0"}


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
    timeout_s: float = 0.0        # effective hard time limit
    memory_limit_mb: int = 0      # effective memory limit; 0 = none
    idempotency_key: str = ""
    max_retries: int = 0
    next_attempt_at: float | None = None  # while RETRYING
    starts: int = 0               # RUNNING events seen, redelivered ones too (poison detection)

    @classmethod
    def queued(cls, task_id: str, type: str, queue: str, codec: str, at_s: float, timeout_s: float = 0.0,
               memory_limit_mb: int = 0, idempotency_key: str = "", max_retries: int = 0) -> TaskRecord:
        """A task just accepted (or first heard of), QUEUED at `at_s`."""
        return cls(task_id, type, queue, codec, TaskState.QUEUED, 0, None, "", "", at_s, None, None, at_s,
                   timeout_s, memory_limit_mb, idempotency_key, max_retries)


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


_COLUMNS = [field.name for field in dataclasses.fields(TaskRecord)]
_DEAD_COLUMNS = [field.name for field in dataclasses.fields(DeadLetter)]


class Store:
    """Task records in one SQLite file; used from one thread (the server's event loop)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._db.executescript(_INDEXES)

    def _add_missing_columns(self) -> None:
        """Upgrade a store written by an older version (columns are only ever added)."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name, declaration in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        self._db.close()

    def insert(self, record: TaskRecord) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                         dataclasses.astuple(record))

    def delete(self, task_id: str) -> None:
        self._db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
        self._db.execute("DELETE FROM unconfirmed WHERE task_id = ?", (task_id,))
        self._db.execute("DELETE FROM messages WHERE task_id = ?", (task_id,))

    # -- accepted but not yet confirmed by RabbitMQ ---------------------------------------

    def insert_unconfirmed(self, record: TaskRecord, queue: str, body: bytes) -> None:
        """Store a task with the message that still has to reach RabbitMQ, in one commit;
        the message is also kept until the task is final (the reconciler's copy)."""
        self._db.execute("BEGIN")
        try:
            self.insert(record)
            self._db.execute("INSERT INTO unconfirmed (task_id, queue, body) VALUES (?, ?, ?)",
                             (record.task_id, queue, body))
            self._db.execute("INSERT OR REPLACE INTO messages (task_id, body) VALUES (?, ?)", (record.task_id, body))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def confirm(self, task_id: str) -> None:
        """RabbitMQ confirmed the task's message: nothing left to resend."""
        self._db.execute("DELETE FROM unconfirmed WHERE task_id = ?", (task_id,))

    def unconfirmed(self, task_id: str | None = None) -> list[tuple[str, str, bytes]]:
        """(task id, queue, message body) of tasks whose publish was never confirmed."""
        query = "SELECT task_id, queue, body FROM unconfirmed"
        if task_id is None:
            return self._db.execute(query).fetchall()
        return self._db.execute(f"{query} WHERE task_id = ?", (task_id,)).fetchall()

    # -- the reconciler's look-ups (each an indexed range over unfinished tasks) ---------

    def message(self, task_id: str) -> bytes | None:
        """The task's first message as submitted here (None once final, or if submitted elsewhere)."""
        row = self._db.execute("SELECT body FROM messages WHERE task_id = ?", (task_id,)).fetchone()
        return row[0] if row else None

    def overdue_retries(self, queue: str, due_before_s: float, limit: int) -> list[TaskRecord]:
        """RETRYING tasks of a logical queue whose next attempt was due before `due_before_s`."""
        return self._select(f"WHERE state = {int(TaskState.RETRYING)} AND queue = ? AND next_attempt_at < ? "
                            "ORDER BY next_attempt_at LIMIT ?", (queue, due_before_s, limit))

    def overdue_runs(self, deadline_before_s: float, limit: int) -> list[TaskRecord]:
        """RUNNING tasks whose time limit ran out before `deadline_before_s`, oldest first."""
        return self._select(f"WHERE state = {int(TaskState.RUNNING)} AND started_at + timeout_s < ? AND timeout_s > 0 "
                            "ORDER BY started_at + timeout_s LIMIT ?", (deadline_before_s, limit))

    def queued_before(self, queue: str, created_before_s: float, limit: int) -> list[TaskRecord]:
        """QUEUED tasks of a logical queue created before `created_before_s`, oldest first."""
        return self._select(f"WHERE state = {int(TaskState.QUEUED)} AND queue = ? AND created_at < ? "
                            "ORDER BY created_at LIMIT ?", (queue, created_before_s, limit))

    def _select(self, where: str, params: tuple) -> list[TaskRecord]:
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks {where}", params).fetchall()
        return [_record(row) for row in rows]

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE task_id = ?",
                               (task_id,)).fetchone()
        return _record(row) if row is not None else None

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    def find_by_idempotency_key(self, key: str) -> TaskRecord | None:
        row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE idempotency_key = ?",
                               (key,)).fetchone()
        return _record(row) if row else None

    def purge_finished(self, before_s: float) -> int:
        """Delete tasks that finished before `before_s` (epoch seconds); return how many."""
        return self._db.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?",
                                (before_s,)).rowcount

    # -- dead letters ------------------------------------------------------------------

    def add_dead_letter(self, dead: DeadLetter) -> None:
        placeholders = ", ".join("?" for _ in _DEAD_COLUMNS)
        self._db.execute(f"INSERT OR REPLACE INTO dead_letters ({', '.join(_DEAD_COLUMNS)}) "
                         f"VALUES ({placeholders})", dataclasses.astuple(dead))

    def dead_letters(self, limit: int, task_ids: list[str] | None = None) -> tuple[list[DeadLetter], int]:
        """Dead letters, oldest first (these ids only, if given), and how many there are in all."""
        query = f"SELECT {', '.join(_DEAD_COLUMNS)} FROM dead_letters"
        params: tuple = ()
        if task_ids is not None:
            query += f" WHERE task_id IN ({', '.join('?' for _ in task_ids)})"
            params = tuple(task_ids)
        rows = self._db.execute(f"{query} ORDER BY dead_at LIMIT ?", (*params, limit)).fetchall()
        return [_dead_letter(row) for row in rows], self.count_dead_letters()

    def count_dead_letters(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def remove_dead_letters(self, task_ids: list[str] | None = None) -> int:
        """Remove these dead letters (all if None); return how many went."""
        if task_ids is None:
            return self._db.execute("DELETE FROM dead_letters").rowcount
        return self._db.execute(f"DELETE FROM dead_letters WHERE task_id IN ({', '.join('?' for _ in task_ids)})",
                                tuple(task_ids)).rowcount

    def apply(self, events: Iterable[TaskEvent], codec_of: dict[str, str]) -> list[TaskRecord]:
        """Apply events in one transaction; return every record change, in order.

        Duplicates and stale events change nothing (see qm.states.supersedes). An event
        for a task this replica never saw (submitted through another server) creates it.
        """
        latest: dict[str, TaskRecord] = {}
        changes: list[TaskRecord] = []  # intermediate states too: followers see RUNNING
        self._db.execute("BEGIN")
        try:
            for event in events:
                current = latest.get(event.task_id) or self.get(event.task_id)
                updated = _next_record(current, event, codec_of.get(event.type, "text"))
                if event.state is TaskState.RUNNING and _is_new_start(current, event):
                    started = updated or current  # every start counts, a redelivered one too
                    if not started.state.terminal:  # a redelivery: the worker running it now
                        # Starts count per attempt: a task that fails and retries normally is
                        # never mistaken for one that takes its workers down.
                        new_attempt = current is None or event.attempt > current.attempts
                        updated = dataclasses.replace(
                            started, starts=1 if new_attempt else started.starts + 1, started_at=event.at_s,
                            updated_at=event.at_s, worker=event.worker or started.worker)
                if updated is not None:
                    latest[event.task_id] = updated
                    changes.append(updated)
            for record in latest.values():
                self._upsert(record)
                if record.state.terminal:
                    self._db.execute("DELETE FROM messages WHERE task_id = ?", (record.task_id,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return changes

    def _upsert(self, record: TaskRecord) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(f"INSERT OR REPLACE INTO tasks ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                         dataclasses.astuple(record))


def _record(row: tuple) -> TaskRecord:
    values = dict(zip(_COLUMNS, row))
    values["state"] = TaskState(values["state"])
    return TaskRecord(**values)


def _dead_letter(row: tuple) -> DeadLetter:
    values = dict(zip(_DEAD_COLUMNS, row))
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
    return dataclasses.replace(
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
