"""Every statement the PostgreSQL store runs finds its rows through an index, on tables
seeded with realistic row counts and ANALYZEd, with the planner's defaults (sequential
scans allowed: the planner must choose an index because it is cheaper, as it would in
production).

The statements are recorded, not listed by hand: a PgStore subclass wraps each pooled
connection so every query it runs (with its arguments) is kept, WORKLOAD drives one step
per public store method (a method no step calls fails the test), and each distinct
statement is then put through `EXPLAIN (FORMAT JSON)` with the arguments it ran with. Any
Seq Scan of a table that grows with the store fails; `counters` (at most 16 rows per
counted table), `unconfirmed` (a row lives until its publish is confirmed) and `sweeps`
(one row per kind of sweep) are small.
The schema's own statements (run once at start, under the migration lock) are not checked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from qm.messages import TaskEvent, TaskMessage
from qm.server.store_api import DeadLetter, GroupRecord, ScheduleRecord, TaskRecord
from qm.server.store_pg import PgStore
from qm.states import TaskState
from tests.postgres_fixtures import fresh_database, postgres  # noqa: F401  (fixture)
from tests.unit.aio import run

pytestmark = [pytest.mark.postgres, pytest.mark.processes, pytest.mark.slow]

S = TaskState
T0 = 1_700_000_000.0
#: Rows seeded: enough that a scan costs the planner far more than an index look-up.
SEEDED_TASKS = 50_000
SEEDED_DEAD_LETTERS = 5_000
SEEDED_SCHEDULES = 5_000
SEEDED_GROUPS = 5_000  # half the seeded tasks are members, 5 each
#: Tables that do not grow with the store.
SMALL_TABLES = {"counters", "unconfirmed", "sweeps"}


class Recording:
    """A connection that remembers (query, args) of everything run through it."""

    def __init__(self, connection: asyncpg.Connection, seen: list[tuple[str, tuple]]) -> None:
        self._connection = connection
        self._seen = seen

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._connection, name)
        if name in ("fetch", "fetchrow", "fetchval", "execute"):
            async def recorded(query: str, *args: Any, **kwargs: Any) -> Any:
                self._seen.append((query, args))
                return await attribute(query, *args, **kwargs)
            return recorded
        if name == "executemany":
            async def recorded_many(query: str, rows: list, **kwargs: Any) -> Any:
                self._seen.append((query, tuple(rows[0])))
                return await attribute(query, rows, **kwargs)
            return recorded_many
        return attribute


class RecordingPgStore(PgStore):
    seen: list[tuple[str, tuple]]

    @contextlib.asynccontextmanager
    async def _connection(self, transaction: bool = False) -> AsyncIterator[Any]:
        async with super()._connection(transaction) as connection:
            yield Recording(connection, self.seen)


WORKLOAD: list[Callable[[PgStore], Awaitable[Any]]] = []


def step(function: Callable[[PgStore], Awaitable[Any]]) -> Callable[[PgStore], Awaitable[Any]]:
    WORKLOAD.append(function)
    return function


def record(task_id: str, key: str = "") -> TaskRecord:
    return TaskRecord.queued(task_id, "math", "default", "text", T0, 10.0, idempotency_key=key)


@step
async def submit_confirm_and_retry(store: PgStore) -> None:
    await store.insert_unconfirmed(record("new-1", key="key-new-1"), "default", b"m")
    await store.find_by_idempotency_key("key-new-1")
    await store.unconfirmed("new-1")
    await store.unconfirmed()
    await store.confirm("new-1")
    await store.insert(record("new-2"))
    await store.insert_unconfirmed(record("new-3"), "default", b"m")
    await store.delete("new-3")


@step
async def events_statuses_and_followers(store: PgStore) -> None:
    await store.apply([TaskEvent("new-1", "math", "default", 1, S.RUNNING, "w", at_s=T0 + 1),
                       TaskEvent("seed-7", "math", "default", 1, S.SUCCEEDED, "w", b"1", at_s=T0 + 2),
                       TaskEvent("unknown-1", "math", "default", 1, S.RUNNING, "w", at_s=T0 + 3)], {})
    await store.get("new-1")
    await store.get_many(["new-1", "seed-9"])
    await store.message("new-1")
    await store.count()


@step
async def reconciler(store: PgStore) -> None:
    await store.claim_reconcile(15.0)
    await store.overdue_runs(T0, 500)
    await store.overdue_retries("default", T0, 500)
    await store.overdue_scheduled("default", T0, 500)
    await store.queued_before("default", T0, 500)


@step
async def retention(store: PgStore) -> None:
    await store.purge_finished(T0 + 10, 1000)


@step
async def dead_letters(store: PgStore) -> None:
    await store.add_dead_letter(DeadLetter("new-dead", "math", "default", S.FAILED, 1, "r", "e", b"b", T0))
    await store.dead_letters(100)
    await store.dead_letters(100, bodies=False)
    await store.dead_letters(100, ["new-dead", "dead-3"])
    await store.count_dead_letters()
    await store.remove_dead_letters(["new-dead"])
    await store.remove_dead_letters(None, 1000)
    await store.remove_dead_letters(None, 1000, dead_before_s=T0 + 10)


@step
async def schedules(store: PgStore) -> None:
    new = ScheduleRecord("new-schedule", "", 5.0, "UTC", "coalesce", "math", "default", b"1", "{}", T0, T0 + 5)
    await store.add_schedule(new)
    await store.get_schedule("new-schedule")
    await store.list_schedules("", 100)
    await store.list_schedules("schedule-2", 100)
    await store.count_schedules()
    await store.due_schedules(T0 + 10, 100)
    await store.next_schedule_at()
    fired = TaskRecord.queued("fired", "math", "default", "text", T0 + 5, idempotency_key="schedule:new:1",
                              schedule_id="new-schedule")
    await store.claim_tick("new-schedule", T0 + 5, T0 + 10, (fired, "default", b"m"), tick_s=T0 + 5)
    await store.claim_tick("new-schedule", T0 + 10, T0 + 15, None, missed=1)
    await store.remove_schedule("new-schedule")


@step
async def groups(store: PgStore) -> None:
    body = TaskMessage("cb-new", "math", b"0", "default").encode()
    group = GroupRecord("grp-new", 2, 0, T0, None, "cb-new", "default", body, "gkey-new", "group1:x")
    members = [(dataclasses.replace(record(f"gm-{i}"), group_id="grp-new", group_index=i), "default", b"m")
               for i in range(2)]
    await store.find_group_by_idempotency_key("gkey-new")
    await store.insert_group(group, members)
    await store.get_group("grp-new")
    await store.group_members("grp-new")
    await store.apply([TaskEvent(f"gm-{i}", "math", "default", 1, S.SUCCEEDED, "w", b"1", at_s=T0 + 5)
                       for i in range(2)], {})  # the last member: the callback is made


async def seed(url: str) -> None:
    """Tasks in every state (most finished long ago, as retention leaves them), dead
    letters, kept messages; then ANALYZE, so the planner knows the sizes."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"""
            INSERT INTO tasks (task_id, type, queue, codec, state, attempts, created_at, started_at, finished_at,
                               updated_at, timeout_s, idempotency_key, next_attempt_at)
            SELECT 'seed-' || i, 'math', 'q' || (i % 20), 'text',
                   (ARRAY[{int(S.SUCCEEDED)}, {int(S.SUCCEEDED)}, {int(S.FAILED)}, {int(S.QUEUED)},
                          {int(S.RUNNING)}, {int(S.RETRYING)}])[1 + i % 6],
                   1, {T0} - 86400 + i, {T0} - 86400 + i,
                   CASE WHEN i % 6 < 3 THEN {T0} - 86400 + i + 1 END, {T0}, 30,
                   CASE WHEN i % 2 = 0 THEN 'key-' || i ELSE '' END,
                   CASE WHEN i % 6 = 5 THEN {T0} + i END
            FROM generate_series(1, {SEEDED_TASKS}) AS i""")
        await connection.execute(f"""
            UPDATE tasks SET group_id = 'grp-' || (1 + n / 2 % {SEEDED_GROUPS}), group_index = n / 2 / {SEEDED_GROUPS}
            FROM (SELECT task_id AS id, substr(task_id, 6)::int AS n FROM tasks) AS seeded
            WHERE task_id = seeded.id AND seeded.n % 2 = 0""")
        await connection.execute(f"""
            INSERT INTO task_groups (group_id, members, finished, created_at, completed_at, callback_task_id,
                                     callback_queue, callback_body, idempotency_key, request_digest)
            SELECT 'grp-' || i, 5, 5, {T0} - 86400 + i, CASE WHEN i % 2 = 0 THEN {T0} - 86400 + i + 1 END,
                   'cb-' || i, 'default', 'body'::bytea, CASE WHEN i % 2 = 0 THEN 'gkey-' || i ELSE '' END, ''
            FROM generate_series(1, {SEEDED_GROUPS}) AS i""")
        await connection.execute(f"""
            INSERT INTO messages (task_id, body) SELECT 'seed-' || i, 'body'::bytea
            FROM generate_series(1, {SEEDED_TASKS}) AS i WHERE i % 6 >= 3""")
        await connection.execute(f"""
            INSERT INTO dead_letters (task_id, type, queue, state, attempts, reason, error, body, dead_at)
            SELECT 'dead-' || i, 'math', 'default', {int(S.FAILED)}, 1, 'failed', 'boom', 'body'::bytea, {T0} + i
            FROM generate_series(1, {SEEDED_DEAD_LETTERS}) AS i""")
        await connection.execute(f"""
            INSERT INTO schedules (schedule_id, cron, every_s, timezone, missed, type, queue, payload, options_json,
                                   created_at, next_fire_at)
            SELECT 'schedule-' || i, '', 60, 'UTC', 'coalesce', 'math', 'default', '1'::bytea, '{{}}', {T0},
                   {T0} + 3600 + i
            FROM generate_series(1, {SEEDED_SCHEDULES}) AS i""")
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


def seq_scans(plan: dict) -> list[str]:
    """Relations a plan (or any node under it) reads with a Seq Scan."""
    found = [plan["Relation Name"]] if plan.get("Node Type") == "Seq Scan" else []
    for child in plan.get("Plans", []):
        found += seq_scans(child)
    return found


def test_every_statement_of_the_postgres_store_uses_an_index(postgres):  # noqa: F811  (fixture)
    url = fresh_database(postgres)

    async def record_and_explain() -> dict[str, list[str]]:
        store = RecordingPgStore(url, "server-plans", pool_size=2)
        store.seen = []
        await store.connect()
        try:
            await seed(url)
            for run_step in WORKLOAD:
                await run_step(store)
            statements = {query: args for query, args in store.seen}
            async with store._pool.acquire() as connection:  # type: ignore[union-attr]
                plans = {}
                for query, args in statements.items():
                    if query.startswith("SELECT pg_notify"):
                        continue
                    explained = await connection.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args)
                    plans[query] = seq_scans(json.loads(explained)[0]["Plan"])
                return plans
        finally:
            await store.close()

    plans = run(record_and_explain, timeout_s=240.0)
    public = {name for name, member in inspect.getmembers(PgStore, inspect.iscoroutinefunction)
              if not name.startswith("_") and name not in ("close", "connect", "open")}
    called = {name for name in public
              if any(f"store.{name}(" in inspect.getsource(function) for function in WORKLOAD)}
    assert public == called, f"store methods no WORKLOAD step calls: {sorted(public - called)}"
    assert len(plans) >= 15, plans
    scanned = {query: [table for table in tables if table not in SMALL_TABLES] for query, tables in plans.items()}
    assert not {query: tables for query, tables in scanned.items() if tables}, scanned
