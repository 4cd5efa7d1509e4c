"""Idempotency keys that cannot be misused: the same key with the same request is the same
task, with another request it is refused; the request digest and its store column."""
from __future__ import annotations

import sqlite3
import time

import pytest

from qm.errors import BrokerUnavailable, IdempotencyKeyReused, ValidationError
from qm.messages import TaskEvent
from qm.server.idempotency import check_reuse, request_digest
from qm.server.store import Store, TaskRecord
from qm.states import TaskState
from tests.unit.aio import Blocking, run
from tests.unit.harness import WORK_QUEUE, server

S = TaskState

BASE = dict(task_type="math", payload=b"1 + 1", queue="default", timeout_s=5.0, memory_limit_mb=0,
            retry_options={"max_retries": 2, "jitter": None})


def digest(**change) -> str:
    return request_digest(**{**BASE, **change})


def test_the_digest_is_stable_and_ignores_only_spelling():
    assert digest() == digest() and digest().startswith("v1:")
    assert digest(timeout_s=5) == digest()                                  # int or float seconds
    assert digest(retry_options={"jitter": None, "max_retries": 2}) == digest()  # order of options
    assert digest(retry_options={"max_retries": 2}) == digest()             # unset = None


@pytest.mark.parametrize("change", [dict(task_type="test.echo"), dict(payload=b"1 + 2"), dict(queue="q"),
                                    dict(timeout_s=5.5), dict(soft_timeout_s=1.0), dict(memory_limit_mb=1),
                                    dict(retry_options={"max_retries": 3}),
                                    dict(retry_options={"max_retries": 2, "jitter": True}),
                                    dict(retry_options={})])
def test_any_field_of_the_request_changes_the_digest(change):
    assert digest(**change) != digest()


def test_a_payload_is_never_confused_with_its_neighbour_fields():
    assert digest(payload=b"a", queue="bc") != digest(payload=b"ab", queue="c")


def test_check_reuse_refuses_only_a_comparable_different_digest():
    check_reuse("k", digest(), digest(), "t1")
    check_reuse("k", "", digest(payload=b"x"), "t1")               # stored before digests
    check_reuse("k", "v0:abc", digest(payload=b"x"), "t1")         # another encoding version
    with pytest.raises(IdempotencyKeyReused, match="'k' was already used for another request.*t1"):
        check_reuse("k", digest(), digest(payload=b"x"), "t1")


def test_an_older_store_gains_the_digest_column_and_keeps_its_keys(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE tasks (task_id TEXT PRIMARY KEY, type TEXT NOT NULL, queue TEXT NOT NULL, "
                "codec TEXT NOT NULL, state INTEGER NOT NULL, attempts INTEGER NOT NULL, result BLOB, "
                "error TEXT NOT NULL DEFAULT '', worker TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, "
                "started_at REAL, finished_at REAL, updated_at REAL NOT NULL, "
                "idempotency_key TEXT NOT NULL DEFAULT '')")
    old.execute("INSERT INTO tasks (task_id, type, queue, codec, state, attempts, created_at, updated_at, "
                "idempotency_key) VALUES ('t1', 'math', 'default', 'text', 1, 0, 1.0, 1.0, 'old-key')")
    old.commit()
    old.close()

    store = Blocking(Store(path))
    try:
        found = store.find_by_idempotency_key("old-key")
        assert found.task_id == "t1" and found.request_digest == ""
        store.insert(TaskRecord("t2", "math", "default", "text", TaskState.QUEUED, 0, None, "", "", 2.0, None,
                                None, 2.0, idempotency_key="new-key", request_digest=digest()))
        assert store.find_by_idempotency_key("new-key").request_digest == digest()
    finally:
        store.close()


def test_the_key_look_up_is_a_search_of_the_partial_index(tmp_path):
    store = Blocking(Store(tmp_path / "s.sqlite3"))
    try:
        plan = store._db.execute("EXPLAIN QUERY PLAN SELECT task_id FROM tasks "
                                 "WHERE idempotency_key = ? AND idempotency_key != ''", ("k",)).fetchall()
        assert "USING INDEX tasks_by_idempotency_key" in " ".join(str(row[-1]) for row in plan), plan
        assert store.find_by_idempotency_key("") is None
    finally:
        store.close()


# -- through the service ----------------------------------------------------------------

def test_the_same_key_with_the_same_request_returns_the_first_task(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            options = dict(queue="", timeout_s=5, memory_limit_mb=64, idempotency_key="k", max_retries=2)
            first = await parts.service.submit("math", b"1 + 1", **options)
            # The same request as another client sends it: the default queue by name, the
            # timeout as a float, the unset retry options spelled out as None.
            same = {**options, "queue": "default", "timeout_s": 5.0}
            again = await parts.service.submit("math", b"1 + 1", **same, backoff_s=None, jitter=None)
            assert again.task_id == first.task_id
            assert (await parts.store.count()) == 1 and parts.broker.queue_depth(WORK_QUEUE) == 1
    run(body)


def test_a_repeat_is_answered_with_the_first_task_while_rabbitmq_is_away(tmp_path):
    """The client retries a submit whose answer it lost; meanwhile RabbitMQ went away. The
    first task is durable, so the repeat gets it; only a new task is refused."""
    async def body():
        async with server(tmp_path) as parts:
            first = await parts.service.submit("math", b"1 + 1", idempotency_key="k")
            parts.broker._drop_connection()
            again = await parts.service.submit("math", b"1 + 1", idempotency_key="k")
            assert again.task_id == first.task_id
            with pytest.raises(BrokerUnavailable):
                await parts.service.submit("math", b"1 + 1", idempotency_key="new-key")
            assert (await parts.store.count()) == 1
    run(body)


def test_a_repeat_whose_request_is_refused_now_is_still_told_the_key_was_used(tmp_path):
    """A key reused for a request that is invalid: the answer names the key, not the payload."""
    async def body():
        async with server(tmp_path) as parts:
            first = await parts.service.submit("math", b"1 + 1", idempotency_key="k")
            with pytest.raises(IdempotencyKeyReused, match=first.task_id):
                await parts.service.submit("math", b"1 +", idempotency_key="k")
            with pytest.raises(ValidationError):
                await parts.service.submit("math", b"1 +", idempotency_key="other")
    run(body)


@pytest.mark.parametrize("change", [
    dict(task_type="test.echo"), dict(payload=b"2 + 2"), dict(queue="other"), dict(timeout_s=6.0),
    dict(memory_limit_mb=128), dict(soft_timeout_s=1.0), dict(max_retries=3), dict(backoff_s=2.0),
    dict(jitter=False),
])
def test_the_same_key_with_another_request_is_refused_naming_the_key(tmp_path, change):
    async def body():
        async with server(tmp_path) as parts:
            request = dict(task_type="math", payload=b"1 + 1", queue="", timeout_s=5.0, memory_limit_mb=64,
                           max_retries=2)
            first = await parts.service.submit(**request, idempotency_key="reused-key")
            changed = {**request, **change}
            with pytest.raises(IdempotencyKeyReused) as refused:
                await parts.service.submit(**changed, idempotency_key="reused-key")
            message = str(refused.value)
            assert "'reused-key'" in message and "another request" in message and first.task_id in message
            assert (await parts.store.count()) == 1 and parts.broker.queue_depth(WORK_QUEUE) == 1
    run(body)


def test_a_key_stored_without_a_request_digest_is_accepted_for_any_request(tmp_path):
    """Rows written before digests were kept cannot be compared: the key returns its task."""
    async def body():
        async with server(tmp_path) as parts:
            now = time.time()
            await parts.store.insert(TaskRecord.queued("old-task", "math", "default", "text", now, 600.0,
                                                       idempotency_key="legacy-key"))
            record = await parts.service.submit("math", b"anything + 1", idempotency_key="legacy-key")
            assert record.task_id == "old-task"
    run(body)


def test_a_key_whose_task_was_forgotten_by_retention_is_free_again(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            first = await parts.service.submit("math", b"1 + 1", idempotency_key="k")
            done = TaskEvent(first.task_id, "math", "default", 1, S.SUCCEEDED, result=b"2")
            await parts.service.events.apply([done])
            assert (await parts.store.purge_finished(time.time() + 1)) == 1  # what the retention sweep does

            second = await parts.service.submit("math", b"2 + 2", idempotency_key="k")
            assert second.task_id != first.task_id and second.state is S.QUEUED
            again = await parts.service.submit("math", b"2 + 2", idempotency_key="k")
            assert again.task_id == second.task_id
    run(body)
