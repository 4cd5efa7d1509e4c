"""The server's SQLite replica: records, and events applied idempotently and in order."""
from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time

import pytest

from qm.messages import TaskEvent
from qm.server.store import DeadLetter, Store, TaskRecord
from qm.states import TaskState
from tests.unit.aio import Blocking

S = TaskState
T0 = 1_700_000_000.0


def open_store(path) -> Blocking:
    """A Store whose coroutine methods are called as plain calls (tests.unit.aio.Blocking)."""
    return Blocking(Store(path))


@pytest.fixture
def store(tmp_path):
    opened = open_store(tmp_path / "tasks.db")
    yield opened
    opened.close()


def queued(task_id="t1", task_type="math", queue="default", codec="text", at=T0) -> TaskRecord:
    return TaskRecord(task_id, task_type, queue, codec, S.QUEUED, 0, None, "", "", at, None, None, at)


def event(state, at, task_id="t1", attempt=1, worker="w1", result=b"", error="", task_type="math",
          queue="default") -> TaskEvent:
    return TaskEvent(task_id, task_type, queue, attempt, state, worker, result, error, at)


CODECS = {"math": "text", "j": "json"}


def test_insert_get_delete_count(store):
    record = queued("a")
    store.insert(record)
    store.insert(queued("b", task_type="j", codec="json", queue="high"))
    assert store.get("a") == record
    assert store.get("b").codec == "json" and store.get("b").queue == "high"
    assert store.get("missing") is None
    assert store.count() == 2
    store.delete("a")
    assert store.get("a") is None
    assert store.count() == 1


def test_inserting_an_existing_id_fails_and_keeps_the_original(store):
    store.insert(queued("a"))
    with pytest.raises(sqlite3.IntegrityError):
        store.insert(dataclasses.replace(queued("a"), type="other"))
    assert store.get("a").type == "math"


def test_lifecycle_sets_state_worker_and_timestamps(store):
    store.insert(queued())
    [running] = store.apply([event(S.RUNNING, T0 + 1)], CODECS)
    assert running.state is S.RUNNING and running.attempts == 1 and running.worker == "w1"
    assert running.started_at == T0 + 1 and running.finished_at is None and running.updated_at == T0 + 1
    assert running.created_at == T0
    [done] = store.apply([event(S.SUCCEEDED, T0 + 2, result=b"11")], CODECS)
    assert done == store.get("t1")
    assert done.state is S.SUCCEEDED and done.result == b"11" and done.error == ""
    assert (done.created_at, done.started_at, done.finished_at, done.updated_at) == (T0, T0 + 1, T0 + 2, T0 + 2)


def test_duplicate_event_changes_the_record_once(store):
    store.insert(queued())
    running = event(S.RUNNING, T0 + 1)
    changed = store.apply([running, running], CODECS)
    assert [record.state for record in changed] == [S.RUNNING]
    before = store.get("t1")
    assert store.apply([running], CODECS) == []  # redelivered again later
    assert store.get("t1") == before


def test_duplicate_terminal_event_is_ignored(store):
    store.insert(queued())
    done = event(S.SUCCEEDED, T0 + 2, result=b"11")
    store.apply([done], CODECS)
    assert store.apply([dataclasses.replace(done, at_s=T0 + 9)], CODECS) == []
    assert store.get("t1").finished_at == T0 + 2


def test_late_running_after_succeeded_is_ignored(store):
    store.insert(queued())
    store.apply([event(S.SUCCEEDED, T0 + 2, result=b"11")], CODECS)
    assert store.apply([event(S.RUNNING, T0 + 1, worker="w2")], CODECS) == []
    record = store.get("t1")
    assert record.state is S.SUCCEEDED and record.result == b"11"
    assert record.started_at is None and record.worker == "w1" and record.updated_at == T0 + 2


def test_out_of_order_within_one_batch(store):
    store.insert(queued())
    store.apply([event(S.RUNNING, T0 + 1)], CODECS)
    store.apply([event(S.FAILED, T0 + 2, error="RuntimeError: boom"), event(S.RUNNING, T0 + 3)], CODECS)
    record = store.get("t1")
    assert record.state is S.FAILED and record.started_at == T0 + 1 and record.finished_at == T0 + 2


def test_a_second_terminal_event_does_not_overwrite_the_first(store):
    store.insert(queued())
    store.apply([event(S.SUCCEEDED, T0 + 2, result=b"11")], CODECS)
    store.apply([event(S.CRASHED, T0 + 3, error="the child died")], CODECS)
    record = store.get("t1")
    assert (record.state, record.result, record.error) == (S.SUCCEEDED, b"11", "")


def test_event_for_unknown_task_creates_it(store):
    [created] = store.apply([event(S.RUNNING, T0 + 5, task_id="elsewhere", task_type="j", queue="high",
                                   worker="w9")], CODECS)
    assert created == store.get("elsewhere")
    assert (created.type, created.queue, created.codec) == ("j", "high", "json")
    assert (created.state, created.attempts, created.worker) == (S.RUNNING, 1, "w9")
    assert created.created_at == T0 + 5 and created.started_at == T0 + 5
    assert store.count() == 1


def test_event_for_unknown_task_of_uninstalled_type_defaults_to_text_codec(store):
    store.apply([event(S.SUCCEEDED, T0, task_id="x", task_type="not.here", result=b"r")], CODECS)
    record = store.get("x")
    assert record.codec == "text" and record.state is S.SUCCEEDED and record.result == b"r"


def test_result_stored_only_on_success_and_error_on_failure(store):
    store.insert(queued("ok"))
    store.insert(queued("bad"))
    store.apply([event(S.RUNNING, T0 + 1, task_id="ok", result=b"not yet", error="not yet"),
                 event(S.RUNNING, T0 + 1, task_id="bad")], CODECS)
    assert store.get("ok").result is None and store.get("ok").error == ""
    store.apply([event(S.SUCCEEDED, T0 + 2, task_id="ok", result=b"42"),
                 event(S.FAILED, T0 + 2, task_id="bad", result=b"ignored", error="RuntimeError: boom")],
                CODECS)
    ok, bad = store.get("ok"), store.get("bad")
    assert (ok.state, ok.result, ok.error) == (S.SUCCEEDED, b"42", "")
    assert (bad.state, bad.result, bad.error) == (S.FAILED, None, "RuntimeError: boom")
    assert bad.finished_at == T0 + 2


def test_retrying_keeps_the_error_and_the_next_attempt_counts(store):
    store.insert(queued())
    store.apply([event(S.RUNNING, T0 + 1), event(S.RETRYING, T0 + 2, error="timed out")], CODECS)
    assert store.get("t1").error == "timed out"
    store.apply([event(S.RUNNING, T0 + 3, attempt=2, worker="w2")], CODECS)
    record = store.get("t1")
    assert (record.state, record.attempts, record.worker, record.started_at) == (S.RUNNING, 2, "w2", T0 + 3)
    assert store.apply([event(S.RETRYING, T0 + 4, attempt=1)], CODECS) == []  # late, earlier attempt
    assert store.get("t1").state is S.RUNNING


def test_changed_records_come_back_in_event_order(store):
    for task_id in ("a", "b", "c"):
        store.insert(queued(task_id))
    changed = store.apply([event(S.RUNNING, T0 + 1, task_id=task_id) for task_id in ("c", "a", "b")], CODECS)
    assert [record.task_id for record in changed] == ["c", "a", "b"]


def test_a_failing_batch_changes_nothing(store):
    store.insert(queued())

    def events():
        yield event(S.RUNNING, T0 + 1)
        raise RuntimeError("undecodable in the middle")

    with pytest.raises(RuntimeError):
        store.apply(events(), CODECS)
    assert store.get("t1") == queued()
    store.apply([event(S.RUNNING, T0 + 1)], CODECS)  # the store is still usable
    assert store.get("t1").state is S.RUNNING


def test_records_survive_closing_and_reopening(tmp_path):
    path = tmp_path / "tasks.db"
    first = open_store(path)
    first.insert(queued("a"))
    first.insert(queued("b"))
    first.apply([event(S.SUCCEEDED, T0 + 2, task_id="a", result=b"\x00\xffbinary")], CODECS)
    expected = (first.get("a"), first.get("b"))
    first.close()
    second = open_store(path)
    try:
        assert (second.get("a"), second.get("b")) == expected
        assert second.get("a").result == b"\x00\xffbinary"
        assert second.count() == 2
    finally:
        second.close()


def test_retention_forgets_finished_tasks_and_their_idempotency_keys(tmp_path):
    from qm.states import TaskState

    store = open_store(tmp_path / "retention.sqlite3")

    def record(task_id, finished_at, key):
        state = TaskState.SUCCEEDED if finished_at else TaskState.RUNNING
        return TaskRecord(task_id, "math", "default", "text", state, 1, b"2", "", "w", 10.0, 11.0,
                          finished_at, finished_at or 11.0, idempotency_key=key)

    store.insert(record("old", 100.0, "k-old"))
    store.insert(record("recent", 500.0, "k-recent"))
    store.insert(record("running", None, "k-running"))

    assert store.purge_finished(before_s=200.0) == 1
    assert store.get("old") is None and store.find_by_idempotency_key("k-old") is None
    assert store.get("recent") is not None and store.get("running") is not None
    assert store.find_by_idempotency_key("k-running").task_id == "running"


def test_starts_count_every_later_run_of_a_task_but_not_a_replayed_event(tmp_path):
    from qm.messages import TaskEvent
    from qm.states import TaskState

    store = open_store(tmp_path / "starts.sqlite3")

    def running(at_s, worker):
        return TaskEvent("t1", "math", "default", 1, TaskState.RUNNING, worker, at_s=at_s)

    store.apply([running(10.0, "w1")], {})
    store.apply([running(10.0, "w1")], {})            # the same event again (replayed)
    store.apply([running(20.0, "w2"), running(30.0, "w3")], {})  # redelivered after worker deaths
    assert store.get("t1").starts == 3
    store.apply([TaskEvent("t1", "math", "default", 1, TaskState.CRASHED, "w3", at_s=40.0),
                 running(50.0, "w4")], {})
    assert (store.get("t1").state, store.get("t1").starts) == (TaskState.CRASHED, 3)  # final: no more counting


def test_starts_count_per_attempt_so_ordinary_retries_are_not_poison(tmp_path):
    from qm.messages import TaskEvent
    from qm.states import TaskState

    store = open_store(tmp_path / "retries.sqlite3")
    for attempt in range(1, 8):  # a task failing normally 7 times, retried each time
        at_s = attempt * 10.0
        store.apply([TaskEvent("t1", "test.fail", "default", attempt, TaskState.RUNNING, "w1", at_s=at_s),
                     TaskEvent("t1", "test.fail", "default", attempt, TaskState.RETRYING, "w1", at_s=at_s + 1)], {})
        assert store.get("t1").starts == 1
    store.apply([TaskEvent("t1", "test.fail", "default", 8, TaskState.RUNNING, "w2", at_s=100.0),
                 TaskEvent("t1", "test.fail", "default", 8, TaskState.RUNNING, "w3", at_s=110.0)], {})
    assert store.get("t1").starts == 2  # the eighth attempt took one worker down


# -- costs that must not grow with the store (issue #18) ---------------------------------


def rows_in(path, table: str) -> int:
    """A real COUNT(*), through a connection of its own: what the counters must match."""
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


def finished(task_id: str, at: float, key: str = "") -> TaskRecord:
    return TaskRecord(task_id, "math", "default", "text", S.SUCCEEDED, 1, b"2", "", "w1", at - 1, at - 1, at,
                      at, idempotency_key=key)


def dead(task_id: str, at: float, body: bytes = b"body") -> DeadLetter:
    return DeadLetter(task_id, "math", "default", S.FAILED, 1, "failed", "boom", body, at)


def test_sizes_follow_every_change_without_counting_rows(tmp_path):
    path = tmp_path / "counts.db"
    store = open_store(path)
    try:
        def sizes_match() -> tuple[int, int]:
            sizes = (store.count(), store.count_dead_letters())
            assert sizes == (rows_in(path, "tasks"), rows_in(path, "dead_letters"))
            return sizes

        store.insert(queued("a"))
        store.insert_unconfirmed(queued("b"), "default", b"message")
        store.apply([event(S.RUNNING, T0 + 1, task_id="a"), event(S.RUNNING, T0 + 1, task_id="new")], CODECS)
        store.apply([event(S.SUCCEEDED, T0 + 2, task_id="a")], CODECS)  # updates change no size
        assert sizes_match() == (3, 0)
        store.delete("b")
        assert store.purge_finished(T0 + 10) == 1
        assert sizes_match() == (1, 0)
        store.add_dead_letter(dead("d1", T0))
        store.add_dead_letter(dead("d1", T0 + 1))  # the same task dead again: replaced, not added
        store.add_dead_letter(dead("d2", T0 + 2))
        assert sizes_match() == (1, 2)
        assert store.dead_letters(10)[1] == 2
        store.remove_dead_letters(["d1"])
        assert sizes_match() == (1, 1)
        with pytest.raises(RuntimeError):
            def failing():
                yield event(S.RUNNING, T0 + 3, task_id="never")
                raise RuntimeError("undecodable")
            store.apply(failing(), CODECS)
        assert sizes_match() == (1, 1)  # the rolled-back insert is not counted
    finally:
        store.close()


def test_a_store_written_before_the_counters_is_counted_once_when_opened(tmp_path):
    path = tmp_path / "old.db"
    store = open_store(path)
    for task_id in ("a", "b", "c"):
        store.insert(queued(task_id))
    store.add_dead_letter(dead("d", T0))
    store.close()
    db = sqlite3.connect(path, isolation_level=None)  # as an older version left it
    for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE counters")
    db.close()

    reopened = open_store(path)
    try:
        assert (reopened.count(), reopened.count_dead_letters()) == (3, 1)
        reopened.insert(queued("d"))
        assert reopened.count() == 4 == rows_in(path, "tasks")
    finally:
        reopened.close()


def test_retention_deletes_at_most_a_batch_per_call_and_never_unfinished_tasks(tmp_path):
    store = open_store(tmp_path / "batches.db")
    try:
        for i in range(25):
            store.insert(finished(f"old{i}", T0 + i, key=f"k{i}"))
        store.insert(finished("recent", T0 + 100))
        store.insert(queued("waiting"))
        assert [store.purge_finished(T0 + 50, limit=10) for _ in range(4)] == [10, 10, 5, 0]
        assert store.count() == 2 and store.get("recent") and store.get("waiting")
        assert store.find_by_idempotency_key("k3") is None
    finally:
        store.close()


def test_a_long_retention_sweep_lets_the_event_loop_serve_between_batches(tmp_path):
    from qm.server import maintenance

    store = open_store(tmp_path / "sweep.db")
    for i in range(1000):
        store.insert(finished(f"old{i}", T0 + i))
    store.insert(queued("running"))

    async def sweep_while_serving() -> tuple[int, int]:
        served = 0
        stop = asyncio.Event()

        async def serve() -> None:  # stands for submits and events arriving meanwhile
            nonlocal served
            while not stop.is_set():
                assert await store.target.get("running") is not None
                served += 1
                await asyncio.sleep(0)

        server = asyncio.create_task(serve())
        await asyncio.sleep(0)
        removed = await maintenance.purge_finished(store.target, T0 + 5000, batch_rows=100)
        stop.set()
        await server
        return removed, served

    try:
        removed, served = store.run(sweep_while_serving())
        assert removed == 1000 and store.count() == 1
        assert served >= 10  # served between each of the ten batches, not once after all of them
    finally:
        store.close()


def test_purging_dead_letters_removes_every_one_in_batches(tmp_path):
    from qm.server import maintenance

    store = open_store(tmp_path / "purge.db")
    try:
        for i in range(7):
            store.add_dead_letter(dead(f"d{i}", T0 + i))
        assert store.run(maintenance.purge_dead_letters(store.target, batch_rows=3)) == 7
        assert store.count_dead_letters() == 0 and store.dead_letters(10) == ([], 0)
    finally:
        store.close()


def test_the_checkpoint_thread_cuts_the_wal_back_after_a_burst(tmp_path, monkeypatch):
    import qm.server.store as store_module

    limit = 256 * 1024
    monkeypatch.setattr(store_module, "WAL_SIZE_LIMIT_BYTES", limit)
    path = tmp_path / "wal.db"
    wal = tmp_path / "wal.db-wal"
    store = open_store(path)
    try:
        store.start_checkpoints(interval_s=0.01)
        for i in range(8):  # 4 MiB of WAL, far below the backstop: only the thread checkpoints
            store.add_dead_letter(dead(f"big{i}", T0 + i, body=bytes(512 * 1024)))
        assert wal.stat().st_size > 4 * limit
        deadline = time.monotonic() + 20.0
        writes = 0
        while wal.stat().st_size > limit:  # a commit after a complete checkpoint starts the WAL over
            assert time.monotonic() < deadline, f"WAL still {wal.stat().st_size} bytes"
            writes += 1  # a real change each time: rewriting an identical row writes nothing
            store.add_dead_letter(dead("small", T0 + writes))
            time.sleep(0.02)
        assert store.count_dead_letters() == 9 and store.dead_letters(1)[0][0].body == bytes(512 * 1024)
    finally:
        store.close()


def test_events_change_only_what_they_carry_and_the_task_stays_findable_by_its_key(store):
    submitted = dataclasses.replace(queued(), idempotency_key="k1", timeout_s=30.0, max_retries=2)
    store.insert(submitted)
    store.apply([event(S.RUNNING, T0 + 1)], CODECS)
    store.apply([event(S.SUCCEEDED, T0 + 2, result=b"11")], CODECS)
    record = store.find_by_idempotency_key("k1")
    assert record == store.get("t1")
    assert (record.state, record.result, record.worker, record.started_at, record.finished_at, record.starts) == \
        (S.SUCCEEDED, b"11", "w1", T0 + 1, T0 + 2, 1)
    assert (record.type, record.queue, record.codec, record.created_at, record.timeout_s, record.max_retries) == \
        ("math", "default", "text", T0, 30.0, 2)
