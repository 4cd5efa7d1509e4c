"""Task priorities (qm/priority.py): bands and names, validation, the server's routing, the
worker's order (qm/worker/ready.py, qm/worker/isolation.py, the pool with real children)."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from qm import priority
from qm.broker import topology
from qm.errors import ValidationError
from qm.messages import TaskMessage
from qm.registry import TaskType, validate
from qm.server import idempotency
from qm.worker.isolation import Isolation
from qm.worker.pool import Job, Pool
from qm.worker.ready import ReadyJobs
from tests.unit.aio import run, within
from tests.unit.harness import WORK_QUEUE, records_until_terminal, server
from tests.unit.test_service import take_messages

#: Bound on the pool and gate scenarios (real children on a busy machine).
PROMPT_S = 30.0


@pytest.mark.parametrize("level, name", [
    (9, "qm.tasks.jobs.p7"), (7, "qm.tasks.jobs.p7"),
    (6, "qm.tasks.jobs"), (5, "qm.tasks.jobs"), (4, "qm.tasks.jobs"),
    (3, "qm.tasks.jobs.p0"), (0, "qm.tasks.jobs.p0"),
])
def test_each_priority_travels_in_its_bands_work_queue(level, name):
    assert topology.work_queue_name("jobs", priority=level) == name
    assert f"qm.tasks.{topology.routing_key('jobs', priority=level)}" == name


def test_the_default_priority_keeps_the_plain_work_queue_name():
    assert priority.DEFAULT_PRIORITY == 5
    assert topology.work_queue_name("default") == "qm.tasks.default" == WORK_QUEUE


def test_a_queue_name_that_looks_like_a_band_is_refused():
    assert "priority band" in topology.queue_name_problem("jobs.p7")
    assert topology.queue_name_problem("jobs.prio") is None


@pytest.mark.parametrize("bad", [10, -1, 99, 2.5, True, "9"])
def test_a_priority_out_of_range_is_refused_naming_the_field(bad):
    with pytest.raises(ValidationError) as refused:
        priority.resolve(bad, None)
    assert refused.value.field == "priority" and "0 (lowest) to 9 (highest)" in refused.value.message


def test_unset_priority_is_the_task_types_else_five():
    assert priority.resolve(None, None) == 5
    assert priority.resolve(None, 8) == 8
    assert priority.resolve(0, 8) == 0


def test_a_task_type_declaring_a_bad_priority_is_not_served():
    registry = validate([TaskType("ok", str, priority=9), TaskType("bad", str, priority=10)])
    assert list(registry.types) == ["ok"]
    assert "priority=10" in str(registry.errors[0])


def test_task_messages_carry_their_priority_and_old_ones_are_of_the_default():
    message = TaskMessage("t", "test.echo", b"", "default", priority=0)
    assert TaskMessage.decode(message.encode()).priority == 0
    old = dataclasses.replace(message, priority=5).encode()
    from qm._proto.qm.internal.v1 import messages_pb2
    parsed = messages_pb2.TaskMessage.FromString(old)
    parsed.ClearField("priority")  # as a server before priorities sent it
    assert TaskMessage.decode(parsed.SerializeToString()).priority == 5


def test_the_idempotency_digest_covers_a_priority_as_sent():
    def digest(level):
        return idempotency.request_digest("t", b"p", "default", 0.0, 0, {}, priority=level)

    assert digest(None) == idempotency.request_digest("t", b"p", "default", 0.0, 0, {})  # as before priorities
    assert len({digest(None), digest(5), digest(9)}) == 3


def test_submit_routes_each_priority_to_its_band_and_records_it(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            high = await parts.service.submit("test.echo", b"h", priority=9)
            normal = await parts.service.submit("test.echo", b"n")
            low = await parts.service.submit("test.echo", b"l", priority=0)
            assert (high.priority, normal.priority, low.priority) == (9, 5, 0)
            assert (await parts.store.get(high.task_id)).priority == 9  # kept for qm status
            for queue, record in (("qm.tasks.default.p7", high), (WORK_QUEUE, normal), ("qm.tasks.default.p0", low)):
                [message] = await take_messages(parts.broker, queue, 1)
                assert (message.task_id, message.priority) == (record.task_id, record.priority)
    run(body)


def test_submit_of_priority_10_is_refused_and_leaves_no_trace(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            with pytest.raises(ValidationError) as refused:
                await parts.service.submit("test.echo", b"x", priority=10, idempotency_key="k")
            assert refused.value.field == "priority"
            assert await parts.store.count() == 0
            assert await parts.broker.queue_size(topology.work_queue_name("default", priority=9)) is None
    run(body)


def test_a_task_types_default_priority_applies_unless_the_submit_sets_one(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            types = parts.service.registry.types
            types["test.echo"] = dataclasses.replace(types["test.echo"], priority=8)
            assert (await parts.service.submit("test.echo", b"a")).priority == 8
            assert (await parts.service.submit("test.echo", b"b", priority=1)).priority == 1
    run(body)


def test_ready_jobs_hand_out_the_highest_priority_oldest_first():
    ready: ReadyJobs[tuple[str, int]] = ReadyJobs(lambda item: item[1])
    for item in [("low-1", 0), ("mid-1", 5), ("low-2", 0), ("high", 9), ("mid-2", 5)]:
        ready.append(item)
    ready.appendleft(("mid-returned", 5))  # a job a dying child never started: first of its priority
    ready.remove(("low-2", 0)) if ("low-2", 0) in ready else None
    order = [ready.popleft()[0] for _ in range(len(ready))]
    assert order == ["high", "mid-returned", "mid-1", "mid-2", "low-1"]
    assert not ready


def test_a_waiting_low_priority_suspect_holds_back_only_tasks_not_above_it():
    async def scenario():
        gate, order = Isolation(), []
        await gate.enter(False)  # an ordinary task runs

        async def task(name, suspect, level):
            await gate.enter(suspect, level)
            order.append(name)
            gate.leave(suspect)

        low_suspect = asyncio.create_task(task("low suspect", True, 0))
        high_suspect = asyncio.create_task(task("high suspect", True, 9))
        await within(_until(lambda: gate.suspects_waiting == 2))
        low = asyncio.create_task(task("low", False, 0))
        await asyncio.sleep(0)
        assert order == []  # both suspects wait for the running task; the low one waits behind them
        gate.leave(False)
        await within(asyncio.gather(low_suspect, high_suspect, low))
        return order

    assert run(scenario) == ["high suspect", "low suspect", "low"]


def test_an_urgent_ordinary_task_is_not_held_back_by_a_low_priority_suspect():
    async def scenario():
        gate = Isolation()
        await gate.enter(False)
        suspect = asyncio.create_task(gate.enter(True, 0))
        await within(_until(lambda: gate.suspects_waiting == 1))
        await within(gate.enter(False, 9))  # does not wait for the suspect
        suspect.cancel()
        return gate.running

    assert run(scenario) == 2


def test_suspects_that_arrive_together_start_highest_first_even_when_the_low_one_came_first():
    async def scenario():
        gate, order = Isolation(), []

        async def task(name, level):
            await gate.enter(True, level)
            order.append(name)
            gate.leave(True)

        # nothing runs, as in a worker just restarted: both are created in one loop turn
        await within(asyncio.gather(asyncio.create_task(task("low", 0)), asyncio.create_task(task("high", 9))))
        return order

    assert run(scenario) == ["high", "low"]


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_the_pool_starts_the_highest_priority_job_next():
    """One child, busy; jobs of priority 0, 0, 9, 5 wait; the child then takes 9, 5, 0, 0."""
    async def body():
        pool = Pool(1, "forkserver")
        await pool.start()
        try:
            started: list[str] = []

            def run_job(task_id: str, level: int, payload: str = "0.01"):
                job = Job(task_id, "test.sleep", payload.encode(), priority=level)
                return asyncio.create_task(pool.run(job, lambda: started.append(task_id)))

            busy = run_job("busy", 5, "0.5")
            await within(_until(lambda: started == ["busy"]), PROMPT_S)
            waiting = [run_job("low-1", 0), run_job("low-2", 0), run_job("high", 9), run_job("normal", 5)]
            await within(asyncio.gather(busy, *waiting), PROMPT_S)
            return started
        finally:
            await within(pool.stop(), PROMPT_S)

    assert run(body) == ["busy", "high", "normal", "low-1", "low-2"]


def test_a_delivery_held_unstarted_too_long_is_given_back_and_still_runs_once(tmp_path, caplog):
    """Higher priorities keep a low task's delivery waiting in the worker: past half of
    RabbitMQ's consumer_timeout it goes back to its queue (a copy, not a suspect) instead of
    being held into the timeout; it runs once the child is free, once."""
    from qm.worker.supervisor import Supervisor

    async def body():
        async with server(tmp_path) as parts:
            pool = Pool(1, "forkserver")
            await pool.start()
            supervisor = Supervisor(parts.broker, pool, "w1", ["default"], prefetch=4, consumer_timeout_s=0.4)
            await supervisor.start()
            try:
                updates: asyncio.Queue = asyncio.Queue()
                busy = await parts.service.submit("test.sleep", b"1.0", priority=9)
                low = await parts.service.submit("test.echo", b"low", priority=0)
                parts.service.hub.follow(low.task_id, updates)
                parts.service.hub.follow(busy.task_id, updates)
                seen = await records_until_terminal(updates, {busy.task_id, low.task_id})
            finally:
                await within(supervisor.stop(drain_timeout_s=5.0), PROMPT_S)
                await within(pool.stop(), PROMPT_S)
            return seen

    with caplog.at_level("WARNING", logger="qm.worker.supervisor"):
        seen = run(body)
    finals = {record.task_id: record for record in seen if record.state.terminal}
    assert [record.state.name for record in finals.values()] == ["SUCCEEDED", "SUCCEEDED"]
    assert all(record.attempts == 1 for record in finals.values())
    assert "held unstarted" in caplog.text
