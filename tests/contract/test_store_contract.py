"""The store contract: one suite, run against the SQLite store and a real PostgreSQL.

`StoreContract` holds every case once, written against the TaskStore seam
(qm/server/store_api.py); `TestSQLiteStore` and `TestPostgresStore` only say how to open
a store. Each store is driven through tests.unit.aio.Blocking (its coroutines run to
completion on a loop of its own; asyncpg's pool lives on that loop).

`TestSharedPostgresStore` adds what only a store shared by several servers must do: two
stores (two servers) on one database agree on one task per idempotency key (the
database's unique index, not a lock), apply each other's events onto one row, hear of
each other's changes (NOTIFY), keep their unconfirmed messages apart, delete each
finished row once; and a schema newer than the code is a clear error at open.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import asyncpg
import pytest

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.errors import IdempotencyKeyTaken, StoreSchemaError, StoreUnavailable
from qm.messages import TaskEvent, TaskMessage
from qm.metrics import ServerMetrics
from qm.server import pg_schema
from qm.server.reconciler import Reconciler
from qm.server.store import Store
from qm.server.store_api import DeadLetter, GroupRecord, ScheduleRecord, TaskRecord
from qm.server.store_pg import PgStore
from qm.states import TaskState
from tests.postgres_fixtures import fresh_database, postgres  # noqa: F401  (fixture)
from tests.unit.aio import Blocking

S = TaskState
T0 = 1_700_000_000.0
CODECS = {"math": "text", "j": "json"}
#: Bound on waiting for another server's change to be heard.
HEAR_TIMEOUT_S = 10.0


def queued(task_id="t1", task_type="math", queue="default", at=T0, key="", digest="") -> TaskRecord:
    return TaskRecord.queued(task_id, task_type, queue, CODECS.get(task_type, "text"), at,
                             idempotency_key=key, request_digest=digest)


def event(state, at, task_id="t1", attempt=1, worker="w1", result=b"", error="", task_type="math",
          queue="default", next_attempt_at=None) -> TaskEvent:
    return TaskEvent(task_id, task_type, queue, attempt, state, worker, result, error, at,
                     next_attempt_at_s=next_attempt_at)


def finished(task_id: str, at: float, key: str = "") -> TaskRecord:
    return TaskRecord(task_id, "math", "default", "text", S.SUCCEEDED, 1, b"2", "", "w1", at - 1, at - 1, at,
                      at, idempotency_key=key)


def dead(task_id: str, at: float, body: bytes = b"body") -> DeadLetter:
    return DeadLetter(task_id, "math", "default", S.FAILED, 1, "failed", "boom", body, at)


def group_of(group_id: str, member_ids: list[str], callback_id: str = "cb", key: str = "",
             payload: bytes = b'{"limit": 10}') -> tuple[GroupRecord, list[tuple[TaskRecord, str, bytes]]]:
    """A group and its members (math tasks), as SubmitGroup stores them; callback type j (json)."""
    body = TaskMessage(callback_id, "j", payload, "default").encode() if callback_id else b""
    group = GroupRecord(group_id, len(member_ids), 0, T0, None, callback_id, "default" if callback_id else "",
                        body, key, "v1:digest" if key else "")
    members = [(dataclasses.replace(queued(task_id), group_id=group_id, group_index=index), "default",
                f"m-{task_id}".encode()) for index, task_id in enumerate(member_ids)]
    return group, members


def callbacks(changes: list[TaskRecord]) -> list[TaskRecord]:
    return [record for record in changes if record.group_id and record.group_index < 0]


def open_pg(url: str, server_id: str = "server-a") -> Blocking:
    opened = Blocking(None)
    opened.target = opened.run(PgStore.open(url, server_id, pool_size=4))
    return opened


def schedule(schedule_id: str, next_at: float = T0 + 5, every_s: float = 5.0) -> ScheduleRecord:
    return ScheduleRecord(schedule_id, "", every_s, "UTC", "coalesce", "math", "default", b"6 * 7",
                          '{"timeout_s": 0.0}', T0, next_at)


def fired_task(schedule_id: str, tick: float, task_id: str | None = None) -> TaskRecord:
    return TaskRecord.queued(task_id or f"{schedule_id}@{tick}", "math", "default", "text", tick,
                             idempotency_key=f"schedule:{schedule_id}:{tick}", schedule_id=schedule_id)


class StoreContract:
    """Every case, against `self.open()` (a Blocking store, closed by the fixture)."""

    @pytest.fixture
    def store(self, request):
        opened = self.open(request)
        yield opened
        opened.close()

    def open(self, request) -> Blocking:
        raise NotImplementedError

    def test_a_submitted_task_is_kept_with_its_message_until_confirmed(self, store):
        record = queued("a", key="k-a", digest="v1:abc")
        store.insert_unconfirmed(record, "default", b"message-a")
        assert store.get("a") == record
        assert store.find_by_idempotency_key("k-a") == record
        assert store.unconfirmed() == [("a", "default", b"message-a")]
        assert store.unconfirmed("a") == [("a", "default", b"message-a")]
        store.confirm("a")
        assert store.unconfirmed() == [] and store.message("a") == b"message-a"  # the reconciler's copy
        assert store.count() == 1

    def test_a_key_already_stored_refuses_the_insert_and_stores_nothing(self, store):
        """The submit path finds a repeated key this way, not by a look-up of its own."""
        store.insert_unconfirmed(queued("first", key="k-1"), "default", b"m1")
        store.confirm("first")
        with pytest.raises(IdempotencyKeyTaken) as refused:
            store.insert_unconfirmed(queued("second", key="k-1"), "default", b"m2")
        assert refused.value.key == "k-1"
        assert store.get("second") is None and store.unconfirmed() == [] and store.message("second") is None
        assert store.find_by_idempotency_key("k-1").task_id == "first" and store.count() == 1
        store.insert_unconfirmed(queued("keyless-1"), "default", b"m3")  # no key: never refused
        store.insert_unconfirmed(queued("keyless-2"), "default", b"m4")
        assert store.count() == 3

    def test_a_multi_cpu_task_keeps_its_cpus_through_its_lifecycle(self, store):
        store.insert_unconfirmed(TaskRecord.queued("big", "math", "default", "text", T0, cpus=4), "default", b"m")
        store.apply([TaskEvent("big", "math", "default", 1, S.RUNNING, worker="w", at_s=T0 + 1)], CODECS)
        assert (store.get("big").cpus, store.get("big").state) == (4, S.RUNNING)

    def test_a_failed_publish_leaves_nothing_stored(self, store):
        store.insert_unconfirmed(queued("a", key="k-a"), "default", b"m")
        store.delete("a")
        assert store.get("a") is None and store.find_by_idempotency_key("k-a") is None
        assert store.unconfirmed() == [] and store.message("a") is None and store.count() == 0

    def test_get_many_finds_every_stored_id_asked_for_and_nothing_else(self, store):
        ids = [f"t{i:03d}" for i in range(250)]  # over one look-up's worth on the loop
        for task_id in ids:
            store.insert(queued(task_id))
        store.apply([event(S.SUCCEEDED, T0 + 2, task_id="t007", result=b"7")], CODECS)
        asked = ids[::-1] + ["missing", "t007"]  # any order, an unknown id, a repeat
        records = {record.task_id: record for record in store.get_many(asked)}
        assert sorted(records) == ids
        assert records["t007"] == store.get("t007") and records["t007"].result == b"7"
        assert records["t100"].state is S.QUEUED
        assert store.get_many([]) == [] and store.get_many(["missing"]) == []

    def test_unknown_ids_and_keys_find_nothing(self, store):
        assert store.get("missing") is None
        assert store.find_by_idempotency_key("missing") is None
        assert store.message("missing") is None

    def test_lifecycle_sets_state_worker_timestamps_and_result(self, store):
        store.insert(queued())
        [running] = store.apply([event(S.RUNNING, T0 + 1)], CODECS)
        assert (running.state, running.attempts, running.worker, running.started_at) == (S.RUNNING, 1, "w1", T0 + 1)
        [done] = store.apply([event(S.SUCCEEDED, T0 + 2, result=b"\x00\xffbinary")], CODECS)
        assert done == store.get("t1")
        assert (done.state, done.result, done.error, done.finished_at) == (S.SUCCEEDED, b"\x00\xffbinary", "",
                                                                           T0 + 2)

    def test_duplicate_and_stale_events_change_nothing(self, store):
        store.insert(queued())
        running = event(S.RUNNING, T0 + 1)
        assert [r.state for r in store.apply([running, running], CODECS)] == [S.RUNNING]
        store.apply([event(S.SUCCEEDED, T0 + 2, result=b"11")], CODECS)
        assert store.apply([running, event(S.CRASHED, T0 + 3, error="late")], CODECS) == []
        record = store.get("t1")
        assert (record.state, record.result, record.error) == (S.SUCCEEDED, b"11", "")

    def test_an_event_for_a_task_stored_nowhere_creates_it(self, store):
        [created] = store.apply([event(S.RUNNING, T0 + 5, task_id="x", task_type="j", queue="high")], CODECS)
        assert created == store.get("x")
        assert (created.type, created.queue, created.codec, created.state) == ("j", "high", "json", S.RUNNING)
        assert store.count() == 1

    def test_retries_keep_the_error_and_the_due_time(self, store):
        store.insert(queued())
        store.apply([event(S.RUNNING, T0 + 1), event(S.RETRYING, T0 + 2, error="timed out",
                                                     next_attempt_at=T0 + 30)], CODECS)
        record = store.get("t1")
        assert (record.state, record.error, record.next_attempt_at) == (S.RETRYING, "timed out", T0 + 30)
        assert store.overdue_retries("default", T0 + 31, 10) == [record]
        assert store.overdue_retries("default", T0 + 29, 10) == []
        store.apply([event(S.RUNNING, T0 + 40, attempt=2, worker="w2")], CODECS)
        assert (store.get("t1").attempts, store.get("t1").starts) == (2, 1)

    def test_starts_are_counted_for_poison_detection(self, store):
        store.apply([event(S.RUNNING, T0 + 1, worker="w1")], CODECS)
        store.apply([event(S.RUNNING, T0 + 1, worker="w1")], CODECS)  # replayed: not a start
        store.apply([event(S.RUNNING, T0 + 2, worker="w2"), event(S.RUNNING, T0 + 3, worker="w3")], CODECS)
        assert store.get("t1").starts == 3

    def test_an_outcome_carrying_its_start_counts_it_and_followers_see_running_first(self, store):
        """A run shorter than worker.running_event_delay_s has no RUNNING event: its
        outcome carries the start (started_at), and the store folds both."""
        store.insert(queued())
        quick = dataclasses.replace(event(S.SUCCEEDED, T0 + 2, result=b"11"), started_at_s=T0 + 1,
                                    timeout_s=30.0, memory_limit_mb=64)
        changes = store.apply([quick], CODECS)
        assert [(r.state, r.started_at) for r in changes] == [(S.RUNNING, T0 + 1), (S.SUCCEEDED, T0 + 1)]
        done = store.get("t1")
        assert (done.state, done.result, done.starts, done.attempts) == (S.SUCCEEDED, b"11", 1, 1)
        assert (done.started_at, done.finished_at, done.timeout_s, done.memory_limit_mb) == (T0 + 1, T0 + 2, 30.0, 64)
        assert store.apply([quick], CODECS) == []  # redelivered: nothing counted twice
        assert store.get("t1").starts == 1

    def test_a_retry_carrying_its_start_counts_one_start_per_attempt(self, store):
        store.insert(queued())
        failed = dataclasses.replace(event(S.RETRYING, T0 + 2, error="boom", next_attempt_at=T0 + 10),
                                     started_at_s=T0 + 1)
        store.apply([failed], CODECS)
        record = store.get("t1")
        assert (record.state, record.starts, record.started_at, record.error) == (S.RETRYING, 1, T0 + 1, "boom")
        second = dataclasses.replace(event(S.SUCCEEDED, T0 + 12, attempt=2, result=b"2"), started_at_s=T0 + 11)
        store.apply([second], CODECS)
        record = store.get("t1")
        assert (record.state, record.attempts, record.starts, record.started_at) == (S.SUCCEEDED, 2, 1, T0 + 11)

    def test_a_final_state_drops_the_kept_message(self, store):
        store.insert_unconfirmed(queued("a"), "default", b"m")
        store.confirm("a")
        store.apply([event(S.FAILED, T0 + 2, task_id="a", error="boom")], CODECS)
        assert store.message("a") is None

    def test_scheduled_tasks_are_found_once_due_and_start_like_any_other(self, store):
        store.insert(TaskRecord.queued("later", "math", "default", "text", T0, due_s=T0 + 60))
        record = store.get("later")
        assert (record.state, record.next_attempt_at) == (S.SCHEDULED, T0 + 60)
        assert store.overdue_scheduled("default", T0 + 59, 10) == []
        assert store.overdue_scheduled("default", T0 + 61, 10) == [record]
        assert store.overdue_scheduled("other", T0 + 61, 10) == []
        store.apply([event(S.RUNNING, T0 + 61, task_id="later")], CODECS)
        assert store.get("later").state is S.RUNNING
        assert store.overdue_scheduled("default", T0 + 120, 10) == []

    def test_the_reconciler_finds_overdue_runs_and_old_queued_tasks(self, store):
        store.insert(dataclasses.replace(queued("run"), timeout_s=10.0))
        store.insert(queued("waiting", at=T0))
        store.insert(queued("fresh", at=T0 + 100))
        store.apply([event(S.RUNNING, T0 + 1, task_id="run")], CODECS)
        assert [r.task_id for r in store.overdue_runs(T0 + 12, 10)] == ["run"]
        assert store.overdue_runs(T0 + 10, 10) == []
        assert [r.task_id for r in store.queued_before("default", T0 + 50, 10)] == ["waiting"]
        assert store.queued_before("other", T0 + 500, 10) == []

    def test_a_failing_batch_changes_nothing(self, store):
        store.insert(queued())

        def events():
            yield event(S.RUNNING, T0 + 1)
            raise RuntimeError("undecodable in the middle")

        with pytest.raises(RuntimeError):
            store.apply(events(), CODECS)
        assert store.get("t1") == queued() and store.count() == 1

    def test_retention_deletes_in_batches_and_forgets_keys(self, store):
        for i in range(25):
            store.insert(finished(f"old{i}", T0 + i, key=f"k{i}"))
        store.insert(finished("recent", T0 + 100))
        store.insert(queued("waiting", key="k-waiting"))
        assert [store.purge_finished(T0 + 50, 10) for _ in range(4)] == [10, 10, 5, 0]
        assert store.count() == 2 and store.find_by_idempotency_key("k3") is None
        assert store.find_by_idempotency_key("k-waiting").task_id == "waiting"

    def test_dead_letters_are_listed_oldest_first_replaced_and_removed(self, store):
        store.add_dead_letter(dead("d2", T0 + 2, b"second"))
        store.add_dead_letter(dead("d1", T0 + 1))
        store.add_dead_letter(dead("d1", T0 + 3, b"again"))  # the same task dead again: replaced
        letters, total = store.dead_letters(10)
        assert [(d.task_id, d.body) for d in letters] == [("d2", b"second"), ("d1", b"again")] and total == 2
        assert [d.task_id for d in store.dead_letters(10, ["d1", "nope"])[0]] == ["d1"]
        assert store.remove_dead_letters(["d1"]) == 1
        store.add_dead_letter(dead("d3", T0 + 4))
        assert store.remove_dead_letters(None, 1) == 1  # the oldest
        assert [d.task_id for d in store.dead_letters(10)[0]] == ["d3"] and store.count_dead_letters() == 1
        assert [(d.task_id, d.body) for d in store.dead_letters(10, bodies=False)[0]] == [("d3", b"")]
        store.add_dead_letter(dead("d4", T0 + 10))
        assert store.remove_dead_letters(None, 10, dead_before_s=T0 + 5) == 1  # retention: d3 only
        assert [d.task_id for d in store.dead_letters(10)[0]] == ["d4"]


    def test_schedules_are_added_once_listed_by_id_and_removed(self, store):
        assert store.add_schedule(schedule("b")) == schedule("b")
        assert store.add_schedule(schedule("b", T0 + 99)) == schedule("b")  # the id is taken: unchanged
        store.add_schedule(schedule("a"))
        store.add_schedule(schedule("c", T0 + 1))
        assert [s.schedule_id for s in store.list_schedules("", 2)] == ["a", "b"]
        assert [s.schedule_id for s in store.list_schedules("b", 2)] == ["c"]
        assert store.get_schedule("a") == schedule("a") and store.get_schedule("nope") is None
        assert store.count_schedules() == 3
        assert store.remove_schedule("a") == schedule("a") and store.remove_schedule("a") is None
        assert store.count_schedules() == 2 and store.get_schedule("a") is None

    def test_due_schedules_come_earliest_first_from_their_next_tick(self, store):
        assert store.next_schedule_at() is None and store.due_schedules(T0 + 100, 10) == []
        for name, at in (("late", T0 + 30), ("soon", T0 + 10), ("sooner", T0 + 5)):
            store.add_schedule(schedule(name, at))
        assert store.next_schedule_at() == T0 + 5
        assert [s.schedule_id for s in store.due_schedules(T0 + 10, 10)] == ["sooner", "soon"]
        assert [s.schedule_id for s in store.due_schedules(T0 + 100, 1)] == ["sooner"]

    def test_a_tick_is_claimed_once_with_its_task_in_the_same_write(self, store):
        store.add_schedule(schedule("s", T0 + 5))
        task = fired_task("s", T0 + 5)
        assert store.claim_tick("s", T0 + 5, T0 + 10, (task, "default", b"body"), tick_s=T0 + 5, missed=2)
        assert store.get(task.task_id) == task and store.unconfirmed() == [(task.task_id, "default", b"body")]
        again = fired_task("s", T0 + 5, "second-try")
        assert not store.claim_tick("s", T0 + 5, T0 + 10, (again, "default", b"body"), tick_s=T0 + 5)
        assert store.get("second-try") is None  # the lost claim stored nothing
        stored = store.get_schedule("s")
        assert (stored.next_fire_at, stored.last_tick_at, stored.last_task_id, stored.fires, stored.missed_ticks) == (
            T0 + 10, T0 + 5, task.task_id, 1, 2)
        assert store.claim_tick("s", T0 + 10, T0 + 15, None, missed=1, error="type gone")  # fired nothing
        stored = store.get_schedule("s")
        assert (stored.last_task_id, stored.fires, stored.missed_ticks, stored.last_error) == (
            task.task_id, 1, 3, "type gone")
        store.remove_schedule("s")
        assert not store.claim_tick("s", T0 + 15, T0 + 20, (fired_task("s", T0 + 15), "default", b"b"))
        assert store.get(fired_task("s", T0 + 15).task_id) is None

    def test_a_group_is_stored_with_its_members_unconfirmed(self, store):
        group, members = group_of("g1", ["m0", "m1", "m2"], key="gk")
        store.insert_group(group, members)
        assert store.get_group("g1") == group and store.find_group_by_idempotency_key("gk") == group
        assert store.group_members("g1") == [("m0", S.QUEUED), ("m1", S.QUEUED), ("m2", S.QUEUED)]
        assert store.get("m1").group_id == "g1" and store.get("m1").group_index == 1
        assert sorted(row[0] for row in store.unconfirmed()) == ["m0", "m1", "m2"]
        assert store.get("cb") is None  # the callback exists only once the members are done
        assert store.get_group("missing") is None and store.group_members("missing") == []

    def test_the_last_member_to_finish_makes_the_callback_once_with_every_outcome(self, store):
        group, members = group_of("g1", ["m0", "m1", "m2"])
        store.insert_group(group, members)
        for task_id, _state in store.group_members("g1"):
            store.confirm(task_id)
        assert callbacks(store.apply([event(S.RUNNING, T0 + 1, "m0"), event(S.SUCCEEDED, T0 + 2, "m0", result=b"3"),
                                      event(S.FAILED, T0 + 2, "m1", error="boom"),
                                      event(S.RETRYING, T0 + 2, "m2", error="again", next_attempt_at=T0 + 9)],
                                     CODECS)) == []
        assert store.get_group("g1").finished == 2 and store.get_group("g1").completed_at is None
        changes = store.apply([event(S.SUCCEEDED, T0 + 5, "m2", attempt=2, result=b"4")], CODECS)
        [callback] = callbacks(changes)
        assert (callback.task_id, callback.type, callback.state, callback.group_id) == ("cb", "j", S.QUEUED, "g1")
        assert store.get("cb") == callback and store.get_group("g1").completed_at is not None
        [(task_id, queue, body)] = store.unconfirmed("cb")
        document = json.loads(TaskMessage.decode(body).payload)
        assert document["payload"] == {"limit": 10} and document["task_ids"] == ["m0", "m1", "m2"]
        assert document["results"] == ["3", None, "4"] and document["succeeded"] == 2
        assert document["failures"] == [{"index": 1, "task_id": "m1", "state": "FAILED", "error": "boom"}]
        # The same terminal events again (a redelivery, or another replica's copy): no second callback.
        assert callbacks(store.apply([event(S.SUCCEEDED, T0 + 5, "m2", attempt=2, result=b"4"),
                                      event(S.FAILED, T0 + 2, "m1", error="boom")], CODECS)) == []
        assert store.get_group("g1").finished == 3

    def test_a_cancelled_member_counts_and_a_group_without_callback_completes(self, store):
        group, members = group_of("g2", ["a", "b"], callback_id="")
        store.insert_group(group, members)
        store.apply([event(S.CANCELLED, T0 + 1, "a"), event(S.SUCCEEDED, T0 + 2, "b", result=b"1")], CODECS)
        assert store.get_group("g2").finished == 2 and store.get_group("g2").completed_at is not None
        assert store.group_members("g2") == [("a", S.CANCELLED), ("b", S.SUCCEEDED)]

    def test_retention_forgets_completed_groups(self, store):
        group, members = group_of("g3", ["a"], callback_id="")
        store.insert_group(group, members)
        store.apply([event(S.SUCCEEDED, T0 + 2, "a", result=b"1")], CODECS)
        store.purge_finished(time.time() + 10, 100)
        assert store.get_group("g3") is None and store.get("a") is None


class TestSQLiteStore(StoreContract):
    def open(self, request) -> Blocking:
        return Blocking(Store(request.getfixturevalue("tmp_path") / "tasks.sqlite3"))


#: A real PostgreSQL server process: out of the fast lane (`-m "not rabbitmq and not slow"`).
ON_POSTGRES = [pytest.mark.postgres, pytest.mark.processes, pytest.mark.slow]


class TestPostgresStore(StoreContract):
    pytestmark = ON_POSTGRES

    def open(self, request) -> Blocking:
        return open_pg(fresh_database(request.getfixturevalue("postgres")))


@pytest.fixture
def database(postgres) -> str:  # noqa: F811  (the imported fixture)
    return fresh_database(postgres)


@pytest.fixture
def two_servers(database):
    """Two stores on one database, as two qm-servers sharing it."""
    first, second = open_pg(database, "server-a"), open_pg(database, "server-b")
    yield first, second
    first.close()
    second.close()


class TestSharedPostgresStore:
    pytestmark = ON_POSTGRES

    def test_two_servers_share_one_store_id_and_one_row_per_task(self, two_servers):
        a, b = two_servers
        assert a.target.store_id == b.target.store_id
        a.insert_unconfirmed(queued("t1"), "default", b"m")
        b.apply([event(S.RUNNING, T0 + 1)], CODECS)
        a.apply([event(S.SUCCEEDED, T0 + 2, result=b"7")], CODECS)
        assert a.get("t1") == b.get("t1") and b.get("t1").result == b"7"
        assert a.count() == b.count() == 1

    def test_two_servers_finishing_the_last_members_make_one_callback(self, database):
        async def finish_both() -> list[TaskRecord]:
            a = await PgStore.open(database, "server-a", pool_size=2)
            b = await PgStore.open(database, "server-b", pool_size=2)
            try:
                ids = [f"m{i}" for i in range(20)]
                await a.insert_group(*group_of("g", ids))
                changes = await asyncio.gather(
                    a.apply([event(S.SUCCEEDED, T0 + 1, task_id=i, result=b"1") for i in ids[:10]], CODECS),
                    b.apply([event(S.SUCCEEDED, T0 + 1, task_id=i, result=b"1") for i in ids[10:]], CODECS))
                assert (await a.get_group("g")).finished == 20
                return callbacks(changes[0]) + callbacks(changes[1])
            finally:
                await a.close()
                await b.close()

        assert [record.task_id for record in asyncio.run(finish_both())] == ["cb"]

    def test_a_group_key_is_taken_once_across_servers(self, two_servers):
        a, b = two_servers
        a.insert_group(*group_of("g1", ["a1"], callback_id="cb1", key="gk"))
        with pytest.raises(IdempotencyKeyTaken):
            b.insert_group(*group_of("g2", ["b1"], callback_id="cb2", key="gk"))
        assert b.find_group_by_idempotency_key("gk").group_id == "g1" and b.get("b1") is None

    def test_an_idempotency_key_is_taken_once_across_servers(self, two_servers):
        a, b = two_servers
        a.insert_unconfirmed(queued("first", key="same-key"), "default", b"m1")
        with pytest.raises(IdempotencyKeyTaken):
            b.insert_unconfirmed(queued("second", key="same-key"), "default", b"m2")
        assert b.find_by_idempotency_key("same-key").task_id == "first"
        assert b.get("second") is None and b.unconfirmed("second") == [] and b.count() == 1

    def test_one_server_of_the_store_publishes_a_lost_task_again_not_each(self, database):
        """Both servers' reconcilers sweep at once for a task whose message RabbitMQ lost:
        the store gives one of them the turn, so the task is published again once, and
        the other server takes the turn once the interval has passed."""
        async def sweep_both() -> tuple[list[int], int, list[int]]:
            stores = [await PgStore.open(database, f"server-{name}", pool_size=2) for name in "ab"]
            broker = MemoryBroker()
            await broker.connect()
            work_queue = topology.work_queue_name("default")
            await broker.declare_exchange(topology.TASKS_EXCHANGE, "direct")
            await broker.declare_queue(work_queue)
            await broker.bind_queue(work_queue, topology.TASKS_EXCHANGE, "default")
            try:
                message = TaskMessage("lost", "math", b"1 + 1", "default", enqueued_at_s=T0)
                await stores[0].insert_unconfirmed(queued("lost"), "default", message.encode())
                await stores[0].confirm("lost")

                async def declared(queue: str, priority: int, cpus: int) -> None:
                    return None

                reconcilers = [Reconciler(store, broker, ServerMetrics(), {"default"}, declared, interval_s=30.0,
                                          after_s=60.0) for store in stores]
                late = T0 + 61
                first = await asyncio.gather(*(reconciler.sweep(now_s=late) for reconciler in reconcilers))
                published = broker.queue_depth(work_queue)
                connection = await asyncpg.connect(database)
                try:  # as if the interval passed since that sweep
                    await connection.execute("UPDATE sweeps SET swept_at = swept_at - 60")
                finally:
                    await connection.close()
                again = [await stores[1].claim_reconcile(15.0), await stores[0].claim_reconcile(15.0)]
                return sorted(first), published, again
            finally:
                await broker.close()
                for store in stores:
                    await store.close()

        first, published, again = asyncio.run(sweep_both())
        assert first == [0, 1] and published == 1
        assert again == [True, False]  # either server may take the next turn, one of them

    def test_a_taken_key_in_a_burst_of_submits_refuses_only_its_own(self, database):
        async def burst() -> tuple[list[object], int, list[TaskRecord], int]:
            store = await PgStore.open(database, "server-a", pool_size=2)
            try:
                await store.insert_unconfirmed(queued("first", key="taken"), "default", b"m")
                records = [queued(f"b{i:03d}", key="taken" if i == 40 else f"k{i}") for i in range(100)]
                batches_before = store._inserts.batches
                outcomes = await asyncio.gather(
                    *(store.insert_unconfirmed(record, "default", b"body") for record in records),
                    return_exceptions=True)
                stored = await store.get_many([record.task_id for record in records])
                return outcomes, store._inserts.batches - batches_before, stored, await store.count()
            finally:
                await store.close()

        outcomes, batches, stored, count = asyncio.run(burst())
        assert isinstance(outcomes[40], IdempotencyKeyTaken)
        assert all(outcome is None for i, outcome in enumerate(outcomes) if i != 40)
        assert sorted(record.task_id for record in stored) == [f"b{i:03d}" for i in range(100) if i != 40]
        assert count == 100  # the first task and 99 of the burst
        assert batches == 0  # the taken key spoilt the batch: each was written on its own

    def test_a_burst_of_submits_goes_in_one_batch(self, database):
        async def burst() -> tuple[int, int]:
            store = await PgStore.open(database, "server-a", pool_size=2)
            try:
                before = store._inserts.batches
                await asyncio.gather(*(store.insert_unconfirmed(queued(f"t{i}"), "default", b"body")
                                       for i in range(200)))
                return store._inserts.batches - before, len(await store.unconfirmed())
            finally:
                await store.close()

        batches, unconfirmed = asyncio.run(burst())
        assert batches == 1 and unconfirmed == 200

    def test_concurrent_inserts_of_one_key_store_one_task(self, database):
        async def race() -> list[object]:
            stores = [await PgStore.open(database, f"server-{i}", pool_size=2) for i in range(4)]
            try:
                return await asyncio.gather(
                    *(store.insert_unconfirmed(queued(f"task-{i}", key="raced"), "default", b"m")
                      for i, store in enumerate(stores)), return_exceptions=True)
            finally:
                for store in stores:
                    await store.close()

        outcomes = asyncio.run(race())
        assert sum(outcome is None for outcome in outcomes) == 1
        assert all(isinstance(o, IdempotencyKeyTaken) for o in outcomes if o is not None), outcomes

    def test_concurrent_batches_of_two_servers_land_on_one_row(self, database):
        async def apply_both() -> TaskRecord:
            a = await PgStore.open(database, "server-a", pool_size=2)
            b = await PgStore.open(database, "server-b", pool_size=2)
            try:
                ids = [f"t{i}" for i in range(50)]
                await asyncio.gather(
                    a.apply([event(S.RUNNING, T0 + 1, task_id=i) for i in ids], CODECS),
                    b.apply([event(S.SUCCEEDED, T0 + 2, task_id=i, result=b"ok") for i in reversed(ids)], CODECS))
                records = await a.get_many(ids)
                assert len(records) == 50 and await a.count() == 50
                assert {(r.state, r.result) for r in records} == {(S.SUCCEEDED, b"ok")}
                return records[0]
            finally:
                await a.close()
                await b.close()

        asyncio.run(apply_both())

    def test_each_server_hears_of_the_changes_the_other_applies(self, database):
        async def hear() -> list[list[str] | None]:
            a = await PgStore.open(database, "server-a", pool_size=2)
            b = await PgStore.open(database, "server-b", pool_size=2)
            heard: asyncio.Queue[list[str] | None] = asyncio.Queue()

            async def on_changes(task_ids: list[str] | None) -> None:
                await heard.put(task_ids)

            listener = b.listen(on_changes)
            listener.start()
            try:
                assert await asyncio.wait_for(heard.get(), HEAR_TIMEOUT_S) is None  # listening: catch up
                await b.apply([event(S.RUNNING, T0 + 1, task_id="own")], CODECS)  # its own: not heard
                ids = [str(uuid.uuid4()) for _ in range(400)]  # over one NOTIFY payload
                await a.apply([event(S.RUNNING, T0 + 1, task_id=i) for i in ids], CODECS)
                got: list[str] = []
                while len(got) < len(ids):
                    got += await asyncio.wait_for(heard.get(), HEAR_TIMEOUT_S) or []
                assert sorted(got) == sorted(ids)
                return [got]
            finally:
                await listener.stop()
                await a.close()
                await b.close()

        asyncio.run(hear())

    def test_each_server_publishes_again_only_its_own_unconfirmed_messages(self, two_servers):
        a, b = two_servers
        a.insert_unconfirmed(queued("by-a"), "default", b"ma")
        b.insert_unconfirmed(queued("by-b"), "default", b"mb")
        assert [row[0] for row in a.unconfirmed()] == ["by-a"]
        assert [row[0] for row in b.unconfirmed()] == ["by-b"]
        assert b.unconfirmed("by-a") == [("by-a", "default", b"ma")]  # an idempotent retry landing on b
        assert b.message("by-a") == b"ma"  # any server can publish it again

    def test_two_sweeping_servers_delete_each_finished_row_once(self, database):
        async def sweep_both() -> tuple[int, int]:
            a = await PgStore.open(database, "server-a", pool_size=2)
            b = await PgStore.open(database, "server-b", pool_size=2)
            try:
                await a.apply([event(S.SUCCEEDED, T0 + i, task_id=f"t{i}") for i in range(300)], CODECS)
                removed = await asyncio.gather(*(store.purge_finished(T0 + 1000, 100)
                                                 for store in (a, b, a, b, a, b)))
                return sum(removed), await a.count()
            finally:
                await a.close()
                await b.close()

        assert asyncio.run(sweep_both()) == (300, 0)

    def test_two_servers_claiming_one_tick_fire_it_once(self, database):
        async def race() -> list[object]:
            stores = [await PgStore.open(database, f"server-{i}", pool_size=2) for i in range(4)]
            try:
                await stores[0].add_schedule(schedule("s", T0 + 5))
                claims = []
                for tick in (T0 + 5, T0 + 10, T0 + 15):  # every server tries every tick at once
                    claims += await asyncio.gather(*(
                        store.claim_tick("s", tick, tick + 5, (fired_task("s", tick, f"{tick}-by-{i}"), "default",
                                                                b"m"), tick_s=tick)
                        for i, store in enumerate(stores)))
                stored = await stores[1].get_schedule("s")
                assert (stored.fires, stored.next_fire_at, await stores[2].count()) == (3, T0 + 20, 3)
                return claims
            finally:
                for store in stores:
                    await store.close()

        claims = asyncio.run(race())
        assert [sum(claims[i:i + 4]) for i in (0, 4, 8)] == [1, 1, 1]

    def test_a_schema_newer_than_the_code_is_refused_at_open(self, database):
        async def bump() -> None:
            connection = await asyncpg.connect(database)
            try:
                await connection.execute("UPDATE qm_schema SET version = $1", pg_schema.SCHEMA_VERSION + 1)
            finally:
                await connection.close()

        open_pg(database).close()  # creates the schema
        asyncio.run(bump())
        with pytest.raises(StoreSchemaError, match=rf"schema version {pg_schema.SCHEMA_VERSION + 1}, newer"):
            open_pg(database)

    def test_reopening_keeps_rows_and_the_schema_version(self, database):
        first = open_pg(database)
        first.insert(queued("kept"))
        store_id = first.target.store_id
        first.close()
        second = open_pg(database)
        try:
            assert second.get("kept") == queued("kept") and second.target.store_id == store_id
        finally:
            second.close()

    def test_an_unreachable_server_is_store_unavailable(self, database):
        from qm.testing.rabbitmq import free_port

        url = f"postgresql://postgres@127.0.0.1:{free_port()}/qm"
        with pytest.raises(StoreUnavailable, match="cannot be reached"):
            open_pg(url)


@pytest.mark.postgres
@pytest.mark.processes
@pytest.mark.slow
def test_a_store_of_an_older_schema_is_migrated_at_open_and_keeps_its_rows(database):
    """A store written at schema version 1 (before task progress) is brought to the current
    version when a server opens it; its tasks read back with the new columns' defaults."""
    async def write_version_1() -> None:
        connection = await asyncpg.connect(database)
        try:
            async with connection.transaction():
                await connection.execute(pg_schema.BOOKKEEPING)
                await connection.execute(pg_schema.MIGRATIONS[0])
                await connection.execute("INSERT INTO qm_schema (version, store_id) VALUES (1, 'pg-old')")
                await connection.execute(
                    "INSERT INTO tasks (task_id, type, queue, codec, state, attempts, created_at, updated_at) "
                    "VALUES ('old-task', 'math', 'default', 'text', $1, 0, $2, $2)", int(S.QUEUED), T0)
        finally:
            await connection.close()

    async def version() -> int:
        connection = await asyncpg.connect(database)
        try:
            return await connection.fetchval("SELECT version FROM qm_schema")
        finally:
            await connection.close()

    asyncio.run(write_version_1())
    store = open_pg(database)
    try:
        assert store.target.store_id == "pg-old"  # the store keeps its id (its queues' names)
        assert store.get("old-task") == queued("old-task")
        store.apply([event(S.RUNNING, T0 + 1, task_id="old-task")], CODECS)
        assert store.get("old-task").state is S.RUNNING
    finally:
        store.close()
    assert asyncio.run(version()) == pg_schema.SCHEMA_VERSION >= 2
