"""Bundles (several tasks in one work-queue message) on the in-memory broker, with the real
server logic, supervisor and process pool (tests/unit/harness.py).

No server sends bundles yet; these tests make one the way a server will: they submit
tasks with no worker running, take the single messages off the work queue and put them
back as one bundle message. What a user would notice: every task of a bundle ends with
its own right result and the message is acked once; a redelivered bundle never runs as
one (each task is split off and runs alone, its start on record first); tasks a stopping
worker gives back are not lost; an older worker rejects a bundle instead of running part
of it; a dead-lettered bundle lists each of its tasks.
"""
from __future__ import annotations

import asyncio
import itertools

import pytest

from qm.broker import topology
from qm.broker.base import Delivery
from qm.broker.memory import MemoryBroker, _Message
from qm.messages import TaskMessage, decode_bundle, encode_bundle
from qm.protocol import Header
from qm.states import TaskState
from qm.worker.bundles import BundleAcks
from qm.worker.pool import Pool
from qm.worker.supervisor import Supervisor
from tests.unit.aio import run, within
from tests.unit.harness import WORK_QUEUE, records_until_terminal, server, states


def bundle_the_queue(broker: MemoryBroker, redelivered: bool = False) -> list[str]:
    """Replace every message waiting on the default work queue by one bundle message of
    them, in order, as a server that bundles would publish it; return their task ids."""
    waiting = broker._queues[WORK_QUEUE]
    bodies = [message.body for message in waiting]
    waiting.clear()
    waiting.append(_Message(encode_bundle(bodies), {Header.BUNDLE: len(bodies)}, redelivered))
    return [TaskMessage.decode(body).task_id for body in bodies]


async def start_worker(broker: MemoryBroker, procs: int = 2) -> tuple[Pool, Supervisor]:
    pool = Pool(procs, "forkserver")
    await pool.start()
    supervisor = Supervisor(broker, pool, "w1", ["default"], prefetch=4, running_event_delay_s=0.05)
    await supervisor.start()
    return pool, supervisor


async def submit_all(service, tasks: list[tuple[str, bytes]], updates: asyncio.Queue) -> list[str]:
    ids = []
    for task_type, payload in tasks:
        record = await service.submit(task_type, payload)
        service.hub.follow(record.task_id, updates)
        ids.append(record.task_id)
    return ids


def test_every_task_of_a_bundle_ends_with_its_own_result_and_the_message_is_acked(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            updates: asyncio.Queue = asyncio.Queue()
            expressions = [f"{n} * 3" for n in range(6)]
            ids = await submit_all(parts.service, [("math", e.encode()) for e in expressions], updates)
            assert bundle_the_queue(parts.broker) == ids
            pool, supervisor = await start_worker(parts.broker)
            try:
                seen = await records_until_terminal(updates, set(ids))
                final = {record.task_id: record for record in seen if record.state.terminal}
                assert [final[task_id].state for task_id in ids] == [TaskState.SUCCEEDED] * 6
                assert [final[task_id].result for task_id in ids] == [str(n * 3).encode() for n in range(6)]
                await within(_until(lambda: supervisor.acks.unsettled == 0))
                assert supervisor.acks.split_count == 0
            finally:
                await within(supervisor.stop(drain_timeout_s=5.0))
                await within(pool.stop())
            await parts.broker.close()  # what RabbitMQ would redeliver now: nothing
            assert list(parts.broker._queues[WORK_QUEUE]) == []
    run(body)


def test_a_redelivered_bundle_is_split_and_each_task_runs_alone(tmp_path):
    """Its last holder may have died of one of its tasks: each is published alone, marked a
    suspect, and runs alone (two children, yet no two runs overlap), its start on record."""
    async def body():
        async with server(tmp_path) as parts:
            updates: asyncio.Queue = asyncio.Queue()
            ids = await submit_all(parts.service, [("test.sleep", b"0.3")] * 3, updates)
            bundle_the_queue(parts.broker, redelivered=True)
            pool, supervisor = await start_worker(parts.broker)
            try:
                seen = await records_until_terminal(updates, set(ids))
                final = sorted(
                    (record for record in seen if record.state.terminal), key=lambda record: record.started_at
                )
                assert [record.state for record in final] == [TaskState.SUCCEEDED] * 3
                for earlier, later in itertools.pairwise(final):
                    assert later.started_at >= earlier.finished_at, "two tasks of the split bundle overlapped"
                for task_id in ids:
                    assert TaskState.RUNNING in states([record for record in seen if record.task_id == task_id])
                assert supervisor.acks.split_count == 1
            finally:
                await within(supervisor.stop(drain_timeout_s=5.0))
                await within(pool.stop())
            await parts.broker.close()
            assert list(parts.broker._queues[WORK_QUEUE]) == []
    run(body)


async def stop_while_one_runs(parts, payload: bytes, count: int, drain_timeout_s: float, updates: asyncio.Queue):
    """A bundle of `count` test.sleep tasks on a one-child worker, stopped while one runs;
    the task ids and what is left on the work queue."""
    ids = await submit_all(parts.service, [("test.sleep", payload)] * count, updates)
    bundle_the_queue(parts.broker)
    pool, supervisor = await start_worker(parts.broker, procs=1)
    try:
        await within(_until(lambda: supervisor.busy == 1))
        await within(supervisor.stop(drain_timeout_s=drain_timeout_s))
    finally:
        await within(pool.stop())
    return ids, list(parts.broker._queues[WORK_QUEUE])


def test_a_stopping_worker_gives_back_unstarted_tasks_of_a_bundle_as_single_messages(tmp_path):
    """One child, a bundle of three half-second sleeps: the drain lets the running one finish
    and gives back the two waiting ones as ordinary messages; the bundle is acked."""
    async def body():
        async with server(tmp_path) as parts:
            updates: asyncio.Queue = asyncio.Queue()
            ids, waiting = await stop_while_one_runs(parts, b"0.5", 3, 10.0, updates)
            given_back = sorted(TaskMessage.decode(message.body).task_id for message in waiting)
            # The worker acked what it ran once the outcome was confirmed; the server applies
            # that event on its own time (bounded wait, not a race with a loaded machine).
            for task_id in set(ids) - set(given_back):
                await within(_until_async(lambda t=task_id: _is_terminal(parts.service, t), True))
            assert given_back == sorted(
                set(ids) - {record.task_id for record in _drain(updates) if record.state.terminal}
            )
            assert len(waiting) == 2
            assert all(Header.BUNDLE not in m.headers and Header.SUSPECT not in m.headers for m in waiting)
            assert all(not message.redelivered for message in waiting)
            await parts.broker.close()
            assert len(parts.broker._queues[WORK_QUEUE]) == 2  # the bundle itself was acked
    run(body)


def test_a_task_of_a_bundle_cut_short_goes_back_alone_marked_a_suspect(tmp_path):
    """A drain that runs out kills the running task: it goes back as a message of its own,
    marked a suspect (as RabbitMQ marks a returned message redelivered)."""
    async def body():
        async with server(tmp_path) as parts:
            ids, waiting = await stop_while_one_runs(parts, b"30", 2, 0.2, asyncio.Queue())
            assert sorted(TaskMessage.decode(message.body).task_id for message in waiting) == sorted(ids)
            suspects = [message for message in waiting if Header.SUSPECT in message.headers]
            assert len(suspects) == 1  # the one that ran; the other was given back unstarted
            await parts.broker.close()
            assert len(parts.broker._queues[WORK_QUEUE]) == 2
    run(body)


def test_a_worker_older_than_bundles_cannot_read_one_as_a_task():
    """It rejects the message as undecodable (the servers bundle only for workers that say
    they read bundles): it never runs half of one."""
    bodies = [TaskMessage(f"t{n}", "math", b"1 + 1", "default").encode() for n in range(3)]
    bundle = encode_bundle(bodies)
    assert decode_bundle(bundle) == bodies
    with pytest.raises(ValueError):
        TaskMessage.decode(bundle)
    with pytest.raises(ValueError):
        decode_bundle(bodies[0])  # a single task message is no bundle


def test_a_member_that_cannot_go_back_alone_returns_the_whole_bundle_once_the_rest_settle():
    async def body():
        broker = MemoryBroker()
        await broker.connect()
        await broker.declare_queue("work")
        bodies = [TaskMessage(f"t{n}", "math", b"1", "default").encode() for n in range(3)]
        broker._queues["work"].append(_Message(encode_bundle(bodies), {Header.BUNDLE: 3}))
        delivered: list[Delivery] = []
        await broker.consume("work", delivered.append, prefetch=1)
        await within(_until(lambda: len(delivered) == 1))
        acks = BundleAcks(broker, asyncio.ensure_future)
        acks.track(delivered[0])
        first, second, third = acks.open(delivered[0])
        assert [m.headers[Header.TASK_ID] for m in (first, second, third)] == ["t0", "t1", "t2"]
        acks.done(first)
        acks.nack(second, requeue=True)  # its copy was refused
        acks.done(second)  # settling twice changes nothing
        assert acks.unsettled == 1  # the third still runs: the message stays held
        acks.done(third)
        assert acks.unsettled == 0
        await within(_until(lambda: len(delivered) == 2))  # back in the queue, and delivered again
        again = delivered[1]
        assert again.redelivered and again.headers[Header.BUNDLE] == 3 and decode_bundle(again.body) == bodies
    run(body)


def test_a_dead_lettered_bundle_lists_each_of_its_tasks(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            ids = [(await parts.service.submit("math", f"{n} + 1".encode())).task_id for n in range(3)]
            bodies = [message.body for message in parts.broker._queues[WORK_QUEUE]]
            parts.broker._queues[WORK_QUEUE].clear()
            headers = {
                Header.BUNDLE: 3,
                Header.DEAD_REASON: "test",
                Header.STATE: "FAILED",
                Header.ERROR: "dead on purpose",
            }
            await parts.broker.publish(topology.DEAD_EXCHANGE, "", encode_bundle(bodies), headers)
            await within(_until_async(lambda: _dead_count(parts.service), 3))
            letters, total = await parts.service.dead_letters.list(10)
            assert total == 3 and sorted(letter.task_id for letter in letters) == sorted(ids)
            assert {letter.error for letter in letters} == {"dead on purpose"}
    run(body)


async def _dead_count(service) -> int:
    return (await service.dead_letters.list(10))[1]


async def _until_async(count, expected: int) -> None:
    while await count() != expected:
        await asyncio.sleep(0.01)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def _is_terminal(service, task_id: str) -> bool:
    record = await service.status(task_id)
    return record.state.terminal


def _drain(updates: asyncio.Queue) -> list:
    drained = []
    while not updates.empty():
        drained.append(updates.get_nowait())
    return drained


def test_a_bundle_a_worker_rejected_is_published_again_once_by_the_servers_of_its_store(tmp_path):
    """A worker older than bundles rejects one (RabbitMQ dead-letters it, x-death reason
    `rejected`). With a store per server every server reads every dead letter: only the
    one whose store holds the tasks (Header.ORIGIN) publishes them again, one a message;
    the others drop it. None of them records a dead letter: nothing failed."""
    async def body():
        async with server(tmp_path) as parts:
            ids = [(await parts.service.submit("math", f"{n} + 2".encode())).task_id for n in range(3)]
            bodies = [message.body for message in parts.broker._queues[WORK_QUEUE]]
            parts.broker._queues[WORK_QUEUE].clear()
            rejected = {"x-death": [{"reason": "rejected", "queue": WORK_QUEUE, "count": 1}]}
            parts.service.dead_letters.origin = "store-a"
            for origin in ("store-b", "store-a"):
                headers = {**rejected, Header.BUNDLE: 3, Header.ORIGIN: origin}
                letter = Delivery(encode_bundle(bodies), headers, False, 1, "t", 1)
                await within(parts.service.dead_letters.record(letter))
                if origin == "store-b":
                    assert list(parts.broker._queues[WORK_QUEUE]) == []  # another store's tasks
            again = list(parts.broker._queues[WORK_QUEUE])
            assert [TaskMessage.decode(message.body).task_id for message in again] == ids
            assert all(Header.BUNDLE not in message.headers for message in again)
            assert (await parts.service.dead_letters.list(10))[1] == 0
    run(body)
