"""End to end in one process: TaskService → MemoryBroker → Supervisor → real Pool → events → store."""
from __future__ import annotations

import asyncio
import collections

from qm.broker import topology
from qm.states import TaskState
from qm.worker.pool import Job
from tests.unit.aio import run, within
from tests.unit.harness import WORK_QUEUE, records_until_terminal, states, submit_and_wait, system

S = TaskState


def test_math_task_succeeds_with_result_and_worker(tmp_path):
    async def body():
        async with system(tmp_path) as parts:
            seen = await submit_and_wait(parts.service, "math", b"1 + 2 * 5")
            assert states(seen) == [S.RUNNING, S.SUCCEEDED]  # the hub saw RUNNING first
            done = seen[-1]
            assert (done.result, done.worker, done.attempts, done.error) == (b"11", "w1", 1, "")
            assert done.created_at <= done.started_at <= done.finished_at
            assert (await parts.service.status(done.task_id)) == done
            assert parts.broker.queue_depth(WORK_QUEUE) == 0
    run(body)


def test_failing_task_is_failed_with_the_exception_text(tmp_path):
    async def body():
        async with system(tmp_path) as parts:
            seen = await submit_and_wait(parts.service, "test.fail", b"boom")
            failed = seen[-1]
            assert failed.state is S.FAILED and failed.error.startswith("RuntimeError: boom")
            assert failed.result is None and failed.worker == "w1"
    run(body)


def test_crashing_task_is_crashed_and_the_worker_carries_on(tmp_path):
    async def body():
        async with system(tmp_path) as parts:
            crashed = (await submit_and_wait(parts.service, "test.exit", b"3"))[-1]
            assert crashed.state is S.CRASHED and "code 3" in crashed.error
            after = (await submit_and_wait(parts.service, "test.echo", b"still working"))[-1]
            assert (after.state, after.result) == (S.SUCCEEDED, b"still working")
    run(body)


def test_fifty_tasks_each_succeed_exactly_once(tmp_path):
    async def body():
        async with system(tmp_path) as parts:
            updates: asyncio.Queue = asyncio.Queue()
            expected = {}
            for i in range(50):
                record = await parts.service.submit("math", f"{i} * 3".encode())
                parts.service.hub.follow(record.task_id, updates)
                expected[record.task_id] = str(i * 3).encode()
            seen = await records_until_terminal(updates, set(expected))
            successes = collections.Counter(r.task_id for r in seen if r.state is S.SUCCEEDED)
            assert successes == collections.Counter(set(expected))  # each id exactly once
            assert not [r for r in seen if r.state.terminal and r.state is not S.SUCCEEDED]
            assert (await parts.store.count()) == 50
            for task_id, result in expected.items():
                record = await parts.store.get(task_id)
                assert (record.state, record.result, record.attempts) == (S.SUCCEEDED, result, 1)
            assert parts.broker.queue_depth(WORK_QUEUE) == 0
    run(body)


def test_undecodable_task_message_is_dropped_and_others_run(tmp_path):
    async def body():
        async with system(tmp_path) as parts:
            await parts.service.submit("test.echo", b"declare the queue")
            await parts.broker.publish(topology.TASKS_EXCHANGE, "default", b"\xff garbage", {})
            done = (await submit_and_wait(parts.service, "test.echo", b"after garbage"))[-1]
            assert (done.state, done.result) == (S.SUCCEEDED, b"after garbage")
            assert parts.broker.queue_depth(WORK_QUEUE) == 0  # not requeued forever
            assert (await parts.store.count()) == 2
    run(body)


def test_stop_returns_unstarted_tasks_and_finishes_the_running_one(tmp_path):
    async def body():
        async with system(tmp_path, procs=1, prefetch=4) as parts:
            await within(parts.pool.run(Job("warm-up", "test.pid", b"")))  # the child is up: RUNNING means running
            updates: asyncio.Queue = asyncio.Queue()
            ids = []
            for _ in range(3):
                record = await parts.service.submit("test.sleep", b"0.5")
                parts.service.hub.follow(record.task_id, updates)
                ids.append(record.task_id)
            first = await within(updates.get())
            assert first.state is S.RUNNING
            assert parts.supervisor.busy == 1
            await within(parts.supervisor.stop(drain_timeout_s=10.0))
            assert parts.broker.queue_depth(WORK_QUEUE) == 2
            assert parts.supervisor.busy == 0
            [done] = await records_until_terminal(updates, {first.task_id})
            assert (done.task_id, done.state, done.result) == (first.task_id, S.SUCCEEDED, b"0.5")
            others = [(await parts.store.get(task_id)) for task_id in ids if task_id != first.task_id]
            assert [record.state for record in others] == [S.QUEUED, S.QUEUED]  # never started
            assert updates.empty()
    run(body)
