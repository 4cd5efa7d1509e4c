"""Every statement the store runs while the server serves finds its rows through an index,
so a submit, an event, a status read or a dead-letter call costs the same with a million
tasks stored as with none (issue #18: one unindexed look-up made every submit scan them all).

The statements are not listed by hand, so they cannot drift from the code: every
connection the Store opens is made with a recording sqlite3.Connection subclass
(`Store.connection_factory`), the store is driven through each of its paths, and each
distinct statement is then put through EXPLAIN QUERY PLAN with the parameters it ran with
(bound, as SQLite plans them at run time: a literal value can make a partial index usable
where the real query cannot use it). Any SCAN of a table that grows with the store fails.

Two workloads feed it:
- WORKLOAD below calls the Store directly, one step per path; a public Store method that no
  step calls fails the test, so a new store method needs a step (add a function with @step).
- A TaskService (MemoryBroker, no worker) serves submits, events, statuses, a cancel and
  dead letters, with its background loops (events applier, retention, gauges and whatever
  start_events starts next) running: their statements are checked without anyone listing them.

Statements run while a store is opened are not checked: they run once per start, before
the server serves (creating the schema; counting rows once for a store written before the
counters existed).
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import sqlite3
from typing import Awaitable, Callable

import pytest

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.messages import TaskEvent, TaskMessage
from qm.protocol import dead_letter_headers
from qm.registry import discover
from qm.server.service import TaskService
from qm.server.store import DeadLetter, Store, TaskRecord
from qm.server.store_api import GroupRecord, ScheduleRecord
from qm.states import TaskState
from tests.unit.aio import Blocking, run, within
from tests.unit.harness import MAX_PAYLOAD_BYTES

S = TaskState
T0 = 1_700_000_000.0

#: Tables that do not grow with the store, and why; every other table does.
SMALL_TABLES = {
    "counters": "one row per counted table",
    "unconfirmed": "a row lives only while its task's publish is unconfirmed (deleted at the confirm)",
}
#: Scans allowed because they stop after LIMIT rows: a walk of an index in its order with no
#: sort. Checked: the plan walks an index, sorts nothing, and the statement has a LIMIT.
LIMITED_WALKS = {
    re.compile(r"^SELECT [\w, ']+ FROM dead_letters ORDER BY dead_at LIMIT \?$"):
        "dead letters, oldest first (with or without bodies): walks dead_letters_by_dead_at, stops at the limit",
    re.compile(r"^SELECT next_fire_at FROM schedules ORDER BY next_fire_at LIMIT 1$"):
        "the earliest next tick of any schedule: the first entry of schedules_by_next_fire_at",
}
#: Statement kinds that touch no rows (schema, transactions, settings).
NOT_PLANNED = ("PRAGMA", "BEGIN", "COMMIT", "ROLLBACK", "END", "SAVEPOINT", "RELEASE", "CREATE", "DROP",
               "ALTER", "ANALYZE", "VACUUM")
SCAN = re.compile(r"^SCAN (?P<table>\w+)(?: AS \w+)?(?P<index> USING (?:COVERING )?INDEX \w+)?")


# -- recording every statement ------------------------------------------------------------


@dataclasses.dataclass
class Recorded:
    sql: str
    params: tuple | dict
    script: bool = False


@pytest.fixture
def recorded(monkeypatch) -> list[Recorded]:
    """Every statement run by any Store connection opened during the test, in order."""
    log: list[Recorded] = []

    class Records:
        """execute/executemany/executescript noted before they run (cursor and connection:
        Connection.execute* make a cursor and run it in C, past the cursor's methods)."""

        def execute(self, sql, parameters=(), /):
            log.append(Recorded(sql, parameters))
            return super().execute(sql, parameters)

        def executemany(self, sql, seq_of_parameters, /):
            rows = list(seq_of_parameters)
            log.append(Recorded(sql, rows[0] if rows else ()))
            return super().executemany(sql, rows)

        def executescript(self, script, /):
            log.append(Recorded(script, (), script=True))
            return super().executescript(script)

    class RecordingCursor(Records, sqlite3.Cursor):
        pass

    class RecordingConnection(Records, sqlite3.Connection):
        def cursor(self, factory=RecordingCursor):
            return super().cursor(factory)

    monkeypatch.setattr(Store, "connection_factory", RecordingConnection)
    return log


# -- judging plans ------------------------------------------------------------------------


def plan(db: sqlite3.Connection, statement: Recorded) -> list[str]:
    return [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement.sql}", statement.params)]


def growing_tables(db: sqlite3.Connection) -> set[str]:
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return tables - set(SMALL_TABLES)


def problems_of(db: sqlite3.Connection, statements: list[Recorded]) -> tuple[list[str], set[str], int]:
    """(one line per statement that scans a growing table, the LIMITED_WALKS reasons used,
    how many distinct statements were planned)."""
    growing = growing_tables(db)
    problems, walks_used, planned = [], set(), 0
    distinct: dict[str, Recorded] = {}
    for statement in statements:
        if statement.script:
            problems.append(f"executescript cannot be checked, use execute: {statement.sql[:200]}")
        elif not statement.sql.lstrip().upper().startswith(NOT_PLANNED):
            distinct.setdefault(" ".join(statement.sql.split()), statement)
    for sql, statement in sorted(distinct.items()):
        planned += 1
        details = plan(db, statement)
        scans = [match for match in map(SCAN.match, details) if match and match["table"] in growing]
        if not scans:
            continue
        walk = next((reason for pattern, reason in LIMITED_WALKS.items() if pattern.match(sql)), None)
        bounded = (walk is not None and all(match["index"] for match in scans) and " LIMIT " in sql
                   and not any("TEMP B-TREE" in detail for detail in details))
        if bounded:
            walks_used.add(walk)
        else:
            problems.append(f"{sql}\n    plan: {details}")
    return problems, walks_used, planned


def assert_indexed(db: sqlite3.Connection, statements: list[Recorded]) -> set[str]:
    problems, walks_used, planned = problems_of(db, statements)
    assert planned >= 10, f"only {planned} statements recorded: is the recording working?"
    assert not problems, ("statements that scan a table growing with the store (their cost grows with "
                          "the tasks stored); make them SEARCH through an index:\n" + "\n".join(problems))
    return walks_used


# -- workload 1: the Store, path by path --------------------------------------------------

#: One function per store path. Add one for each new path (the test names public Store
#: methods no step calls).
WORKLOAD: list[Callable[[Store], None]] = []


def step(function: Callable[[Store], None]) -> Callable[[Store], None]:
    WORKLOAD.append(function)
    return function


def queued(task_id: str, key: str = "") -> TaskRecord:
    return TaskRecord(task_id, "math", "default", "text", S.QUEUED, 0, None, "", "", T0, None, None, T0,
                      idempotency_key=key)


def event(task_id: str, state: TaskState, at: float, attempt: int = 1, **fields) -> TaskEvent:
    return TaskEvent(task_id, "math", "default", attempt, state, "w1", at_s=at, **fields)


def dead(task_id: str, at: float) -> DeadLetter:
    return DeadLetter(task_id, "math", "default", S.FAILED, 1, "failed", "boom", b"body", at)


@step
def submit(store: Store) -> None:
    assert store.find_by_idempotency_key("key-a") is None
    store.insert_unconfirmed(queued("a", "key-a"), "default", b"message")
    assert [row[0] for row in store.unconfirmed("a")] == ["a"]
    store.confirm("a")
    assert store.find_by_idempotency_key("key-a").task_id == "a"
    store.insert(queued("plain"))


@step
def refused_publish(store: Store) -> None:
    store.insert_unconfirmed(queued("refused", "key-refused"), "default", b"message")
    store.delete("refused")
    assert store.get("refused") is None


@step
def publish_left_over_at_start(store: Store) -> None:
    store.insert_unconfirmed(queued("left", "key-left"), "default", b"message")
    assert [row[0] for row in store.unconfirmed()] == ["left"]
    store.confirm("left")


@step
def status(store: Store) -> None:
    assert store.get("a").state is S.QUEUED and store.get("missing") is None
    assert [record.task_id for record in store.get_many(["a", "missing"])] == ["a"]


@step
def events(store: Store) -> None:
    store.apply([event("a", S.RUNNING, T0 + 1), event("plain", S.RUNNING, T0 + 1)], {"math": "text"})
    store.apply([event("a", S.SUCCEEDED, T0 + 2, result=b"2"), event("a", S.SUCCEEDED, T0 + 2, result=b"2"),
                 event("plain", S.RETRYING, T0 + 2, error="boom", next_attempt_at_s=T0 + 9),
                 event("elsewhere", S.RUNNING, T0 + 3)], {"math": "text"})
    assert store.get("a").state is S.SUCCEEDED and store.get("elsewhere").state is S.RUNNING


@step
def dead_letters(store: Store) -> None:
    store.add_dead_letter(dead("d1", T0))
    store.add_dead_letter(dead("d1", T0 + 1))  # the same task again: replaced
    for i in range(3):
        store.add_dead_letter(dead(f"d{i + 2}", T0 + 2 + i))
    letters, total = store.dead_letters(2)
    assert [letter.task_id for letter in letters] == ["d1", "d2"] and total == 4
    assert [letter.task_id for letter in store.dead_letters(10, ["d3", "d1"])[0]] == ["d1", "d3"]
    assert store.remove_dead_letters(["d1"]) == 1
    assert [letter.body for letter in store.dead_letters(10, bodies=False)[0]] == [b""] * 3
    assert store.remove_dead_letters(None, limit=2, dead_before_s=0.0) == 0  # retention: none that old
    assert store.remove_dead_letters(None, limit=2) == 2 and store.count_dead_letters() == 1


@step
def reconciler(store: Store) -> None:
    assert store.claim_reconcile(15.0)  # one server per SQLite store: always its turn
    store.insert_unconfirmed(queued("lost"), "default", b"the message")
    assert store.message("lost") == b"the message"
    store.apply([event("lost", S.RUNNING, T0 + 1, timeout_s=5.0),
                 event("lost", S.RETRYING, T0 + 2, next_attempt_at_s=T0 + 3)], {"math": "text"})
    assert "lost" in [record.task_id for record in store.overdue_retries("default", T0 + 100, 10)]
    store.insert(queued("stuck-queued"))
    store.apply([event("stuck-running", S.RUNNING, T0 + 1, timeout_s=5.0)], {"math": "text"})
    assert "stuck-running" in [record.task_id for record in store.overdue_runs(T0 + 100, 10)]
    assert "stuck-queued" in [record.task_id for record in store.queued_before("default", T0 + 100, 10)]
    store.insert(TaskRecord.queued("scheduled", "math", "default", "text", T0, due_s=T0 + 5))
    assert "scheduled" in [record.task_id for record in store.overdue_scheduled("default", T0 + 100, 10)]


@step
def retention(store: Store) -> None:
    assert store.purge_finished(T0 + 10, limit=10) == 1  # "a"


@step
def sizes(store: Store) -> None:
    # what the steps above left (four of them the reconciler's)
    assert (store.count(), store.count_dead_letters()) == (7, 1)


@step
def schedules(store: Store) -> None:
    def schedule(schedule_id: str, next_at: float) -> ScheduleRecord:
        return ScheduleRecord(schedule_id, "* * * * * *", 0.0, "UTC", "coalesce", "math", "default", b"1 + 1",
                              "{}", T0, next_at)

    assert store.add_schedule(schedule("s1", T0 + 1)).schedule_id == "s1"
    assert store.add_schedule(schedule("s1", T0 + 9)).next_fire_at == T0 + 1  # taken: unchanged
    store.add_schedule(schedule("s2", T0 + 2))
    assert [s.schedule_id for s in store.list_schedules("", 1)] == ["s1"]
    assert [s.schedule_id for s in store.list_schedules("s1", 10)] == ["s2"]
    assert store.get_schedule("s2").next_fire_at == T0 + 2 and store.count_schedules() == 2
    assert [s.schedule_id for s in store.due_schedules(T0 + 1, 10)] == ["s1"]
    assert store.next_schedule_at() == T0 + 1
    fired = TaskRecord.queued("fired", "math", "default", "text", T0 + 1, idempotency_key="schedule:s1:t1",
                              schedule_id="s1")
    assert store.claim_tick("s1", T0 + 1, T0 + 2, (fired, "default", b"m"), tick_s=T0 + 1)
    assert not store.claim_tick("s1", T0 + 1, T0 + 2, None)  # claimed already
    store.confirm("fired")
    assert store.remove_schedule("s2").schedule_id == "s2" and store.get_schedule("s2") is None


@step
def wal(store: Store) -> None:
    store.start_checkpoints(interval_s=0.01)
    store.checkpoint()
    store.stop_checkpoints()


@step
def groups(store: Store) -> None:
    body = TaskMessage("callback", "math", b"", "default").encode()
    group = GroupRecord("g", 2, 0, T0, None, "callback", "default", body, "group-key", "v1:x")
    members = [(dataclasses.replace(queued(f"m{i}"), group_id="g", group_index=i), "default", b"m") for i in range(2)]
    assert store.find_group_by_idempotency_key("group-key") is None
    store.insert_group(group, members)
    store.apply([event("m0", S.SUCCEEDED, T0 + 1, result=b"1"), event("m1", S.FAILED, T0 + 1)], {"math": "text"})
    assert store.get_group("g").completed_at is not None and store.get("callback").state is S.QUEUED
    assert store.find_group_by_idempotency_key("group-key").group_id == "g"
    assert store.group_members("g") == [("m0", S.SUCCEEDED), ("m1", S.FAILED)]


class CallsSeen:
    """The store, noting which of its public methods were called."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.called: set[str] = set()

    def __getattr__(self, name: str):
        self.called.add(name)
        return getattr(self._store, name)


def test_every_store_path_finds_its_rows_through_an_index(tmp_path, recorded):
    store = Blocking(Store(tmp_path / "plans.db"))
    try:
        recorded.clear()  # what opening ran is not a serving path
        seen = CallsSeen(store)
        for run_step in WORKLOAD:
            run_step(seen)
        public = {name for name, _ in inspect.getmembers(Store, inspect.isfunction)
                  if not name.startswith("_")}
        uncalled = public - seen.called - {"close"}
        assert not uncalled, f"add a WORKLOAD step for the store method(s) {sorted(uncalled)}"
        walks_used = assert_indexed(store._db, recorded)
        assert walks_used == set(LIMITED_WALKS.values()), "a LIMITED_WALKS entry no statement needs any more"
    finally:
        store.close()


# -- workload 2: the service with its background loops ------------------------------------


async def wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    async def poll() -> None:
        while not await condition():
            await asyncio.sleep(0.01)
    await within(poll())


async def serve_a_little(tmp_path, recorded: list[Recorded]) -> str:
    """Submits, events, status, cancel and dead letters through a TaskService; returns
    the store's path (the store is closed)."""
    store = Store(tmp_path / "service.db")
    recorded.clear()  # what opening ran is not a serving path
    broker = MemoryBroker()
    service = TaskService(registry=discover(), store=store, broker=broker,
                          max_payload_bytes=MAX_PAYLOAD_BYTES)
    await broker.connect()
    await service.start_events("plans")
    try:
        first = await service.submit("math", b"1 + 1", idempotency_key="k1")
        assert (await service.submit("math", b"1 + 1", idempotency_key="k1")).task_id == first.task_id
        second = await service.submit("math", b"2 + 2", idempotency_key="k2")
        for state in (S.RUNNING, S.SUCCEEDED):
            update = TaskEvent(first.task_id, "math", "default", 1, state, "w1", b"2")
            await broker.publish(topology.EVENTS_EXCHANGE, "", update.encode(), {})
        async def first_succeeded() -> bool:
            return (await service.status(first.task_id)).state is S.SUCCEEDED

        async def one_dead_letter() -> bool:
            return await store.count_dead_letters() == 1

        await wait_for(first_succeeded)
        assert (await service.cancel(second.task_id)).state is S.CANCELLED
        message = TaskMessage("gone", "math", b"1/0", "default", 1, T0, 60.0, 0)
        headers = dead_letter_headers(message.headers(), "failed", "FAILED", "boom")
        await broker.publish(topology.DEAD_EXCHANGE, "", message.encode(), headers)
        await wait_for(one_dead_letter)
        letters, total = await service.dead_letters.list(10)
        assert [letter.task_id for letter in letters] == ["gone"] and total == 1
        renamed = await service.dead_letters.requeue(["gone"])
        assert (await service.status(renamed["gone"])).state is S.QUEUED
        await broker.publish(topology.DEAD_EXCHANGE, "", message.encode(), headers)
        await wait_for(one_dead_letter)
        assert await service.dead_letters.purge() == 1
        await service.reconciler.sweep()  # its look-ups too (nothing is overdue here)
    finally:
        await service.stop_events()
        await broker.close()
        await store.close()
    return store.path


def test_every_serving_path_of_the_server_finds_its_rows_through_an_index(tmp_path, recorded):
    path = run(serve_a_little, tmp_path, recorded)
    db = sqlite3.connect(path)
    try:
        assert_indexed(db, recorded)
    finally:
        db.close()


# -- the check itself ---------------------------------------------------------------------


def test_the_check_fails_the_look_up_that_made_every_submit_scan_all_tasks(tmp_path):
    """Issue #18's statement: the partial index on idempotency_key is unusable for `= ?`."""
    store = Blocking(Store(tmp_path / "check.db"))
    try:
        key = "some-key"
        old = Recorded("SELECT task_id FROM tasks WHERE idempotency_key = ?", (key,))
        fixed = Recorded("SELECT task_id FROM tasks WHERE idempotency_key = ? AND idempotency_key != ''",
                         (key,))
        problems, _, _ = problems_of(store._db, [old, fixed])
        assert len(problems) == 1
        assert "WHERE idempotency_key = ?\n" in problems[0] and "SCAN tasks" in problems[0]
        unlimited = Recorded("SELECT task_id FROM dead_letters ORDER BY dead_at", ())
        assert len(problems_of(store._db, [unlimited])[0]) == 1  # a walk with no LIMIT reads every row
    finally:
        store.close()
