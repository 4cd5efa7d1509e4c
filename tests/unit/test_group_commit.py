"""Group commit: submits and event batches share the store's write transactions, a
confirm mark rides with the next write, and nothing a caller was told is stored is lost.
Real SQLite files; MemoryBroker where a service is needed."""
from __future__ import annotations

import asyncio
import sqlite3
import time

from qm.broker.memory import MemoryBroker
from qm.messages import TaskEvent, TaskMessage
from qm.registry import discover
from qm.server import group_commit
from qm.server.service import TaskService
from qm.server.store import Store
from qm.server.store_api import TaskRecord
from qm.server.validators import PayloadValidators
from qm.states import TaskState
from tests.unit.aio import run, within
from tests.unit.harness import MAX_PAYLOAD_BYTES, WORK_QUEUE

S = TaskState
T0 = 1_700_000_000.0


class Transactions:
    """The store's observer: what each transaction committed."""

    def __init__(self) -> None:
        self.writes: list[int] = []
        self.loop_calls: list[tuple[str, float]] = []

    def store_transaction(self, writes: int, seconds: float) -> None:
        self.writes.append(writes)

    def store_loop_call(self, call: str, seconds: float) -> None:
        self.loop_calls.append((call, seconds))


def queued(task_id: str) -> TaskRecord:
    return TaskRecord.queued(task_id, "math", "default", "text", T0)


def unconfirmed_in_file(path: str) -> set[str]:
    """What a restarted server would find unconfirmed: the file, read from outside."""
    db = sqlite3.connect(path)
    try:
        return {task_id for (task_id,) in db.execute("SELECT task_id FROM unconfirmed")}
    finally:
        db.close()


class InlineValidators(PayloadValidators):
    """Payload checks on the event loop, in the order submits arrive."""

    async def check(self, declared, payload: bytes) -> None:
        declared.check_payload(payload)


def test_concurrent_submits_and_an_event_batch_share_transactions(tmp_path):
    """50 submits at once and an event batch: a handful of commits, not 100+."""
    async def body():
        seen = Transactions()
        store = Store(tmp_path / "s.db", observer=seen)
        broker = MemoryBroker()
        # Checks inline: this test is about the store's grouping; validator threads would
        # release the 50 submits to the writer in as many turns as threads finish.
        service = TaskService(discover(), store, broker, max_payload_bytes=MAX_PAYLOAD_BYTES,
                              validators=InlineValidators())
        await broker.connect()
        try:
            first = await service.submit("math", b"0")
            seen.writes.clear()
            records = await asyncio.gather(*(service.submit("math", f"{i} + 1".encode()) for i in range(50)),
                                           service.events.apply([TaskEvent(first.task_id, "math", "default", 1,
                                                                           S.RUNNING, "w1")]))
            assert all(isinstance(record, TaskRecord) for record in records[:50])
            assert broker.queue_depth(WORK_QUEUE) == 51
            assert (await store.get(first.task_id)).state is S.RUNNING
            # 50 inserts, the event batch and 51 confirm marks: two transactions here
            # (everything queued in one loop turn, then the confirms with the next write
            # or the linger), never one per task.
            await within(_until(lambda: not unconfirmed_in_file(store.path)))
            assert sum(seen.writes) == 50 + 1 + 51 and len(seen.writes) <= 4, seen.writes
            assert all(call != "insert_unconfirmed" for call, _ in seen.loop_calls)  # writes never on the loop
        finally:
            await broker.close()
            await store.close()
    run(body)


def test_a_confirm_mark_rides_with_the_next_write_and_unconfirmed_leaves_it_out_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(group_commit, "DEFERRED_LINGER_S", 30.0)  # only a write carries it here

    async def body():
        seen = Transactions()
        store = Store(tmp_path / "s.db", observer=seen)
        try:
            await store.insert_unconfirmed(queued("a"), "default", b"message a")
            await store.confirm("a")
            assert await store.unconfirmed("a") == []
            assert unconfirmed_in_file(store.path) == {"a"}  # a kill -9 now: published again at start
            await store.insert_unconfirmed(queued("b"), "default", b"message b")
            assert unconfirmed_in_file(store.path) == {"b"}  # a's mark came with b's insert
            assert seen.writes == [1, 2]  # one transaction per task
            await store.confirm("b")
            assert await store.unconfirmed() == []
        finally:
            await store.close()
    run(body)


def test_a_lone_confirm_mark_is_written_after_the_linger(tmp_path, monkeypatch):
    monkeypatch.setattr(group_commit, "DEFERRED_LINGER_S", 0.05)

    async def body():
        store = Store(tmp_path / "s.db")
        try:
            await store.insert_unconfirmed(queued("a"), "default", b"message a")
            await store.confirm("a")
            await within(_until(lambda: not unconfirmed_in_file(store.path)))
        finally:
            await store.close()
    run(body)


def test_close_writes_the_pending_confirm_marks(tmp_path, monkeypatch):
    monkeypatch.setattr(group_commit, "DEFERRED_LINGER_S", 30.0)

    async def body():
        store = Store(tmp_path / "s.db")
        await store.insert_unconfirmed(queued("a"), "default", b"message a")
        await store.confirm("a")
        await store.close()
        assert unconfirmed_in_file(store.path) == set()
    run(body)


def test_a_write_that_fails_in_a_shared_transaction_fails_only_its_caller(tmp_path):
    async def body():
        store = Store(tmp_path / "s.db")
        try:
            await store.insert(queued("taken"))
            outcomes = await asyncio.gather(store.insert(queued("new-1")), store.insert(queued("taken")),
                                            store.insert_unconfirmed(queued("new-2"), "default", b"m"),
                                            return_exceptions=True)
            assert outcomes[0] is None and outcomes[2] is None
            assert isinstance(outcomes[1], sqlite3.IntegrityError)
            assert await store.count() == 3
            assert [row[0] for row in await store.unconfirmed()] == ["new-2"]
        finally:
            await store.close()
    run(body)


def test_a_restart_publishes_again_only_what_no_worker_reported_on(tmp_path):
    """Confirm marks not yet written when the server died: a task a worker already
    reported on reached RabbitMQ (not published twice); a QUEUED one is published again."""
    async def body():
        path = tmp_path / "s.db"
        crashed = Store(path)
        for task_id in ("ran", "waiting"):
            message = TaskMessage(task_id, "math", b"1 + 1", "default", 1, T0, 60.0, 0)
            await crashed.insert_unconfirmed(queued(task_id), "default", message.encode())
        await crashed.apply([TaskEvent("ran", "math", "default", 1, S.RUNNING, "w1", at_s=T0 + 1)], {})
        await crashed.close()
        assert unconfirmed_in_file(str(path)) == {"ran", "waiting"}

        store = Store(path)
        broker = MemoryBroker()
        service = TaskService(discover(), store, broker, max_payload_bytes=MAX_PAYLOAD_BYTES)
        await broker.connect()
        await service.start_events("restarted")
        try:
            await within(_until(lambda: not unconfirmed_in_file(str(path))))
            assert broker.queue_depth(WORK_QUEUE) == 1
            delivered = await within(_take(broker))
            assert TaskMessage.decode(delivered).task_id == "waiting"
        finally:
            await service.stop_events()
            await broker.close()
            await store.close()
    run(body)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def _take(broker: MemoryBroker) -> bytes:
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_delivery(delivery) -> None:
        broker.ack(delivery)
        if not got.done():
            got.set_result(delivery.body)

    await broker.consume(WORK_QUEUE, on_delivery, 1)
    return await got


def test_point_reads_on_the_loop_are_timed(tmp_path):
    async def body():
        seen = Transactions()
        store = Store(tmp_path / "s.db", observer=seen)
        try:
            await store.insert(queued("a"))
            started = time.perf_counter()
            assert (await store.get("a")).task_id == "a"
            assert await store.find_by_idempotency_key("none") is None
            elapsed = time.perf_counter() - started
            calls = dict(seen.loop_calls)
            assert set(calls) == {"get", "find_by_idempotency_key"}
            assert sum(calls.values()) <= elapsed
        finally:
            await store.close()
    run(body)
