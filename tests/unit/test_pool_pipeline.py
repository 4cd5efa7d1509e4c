"""Pool.pipeline: a busy child holds its next job and starts it without waiting for the
supervisor; a job queued that way is never lost, never blamed for its neighbour, and
never runs after a cancel. Real child processes (qm-testtasks)."""
from __future__ import annotations

import asyncio
import pathlib

from qm.states import TaskState
from qm.worker.pool import Job, Outcome, Pool, Slot
from tests.unit.aio import run, within
from tests.unit.test_pool import PROMPT_S, job, started_pool, warm_up

S = TaskState
#: Bound on a gated task's wait for its gate (it fails, never hangs, past it).
GATE_BOUND_S = 30


def gated(gate: pathlib.Path, task_id: str) -> Job:
    return job("test.wait_for", f"{GATE_BOUND_S}:{gate}", task_id)


async def queued_behind(pool, running: Job, behind: Job) -> tuple[asyncio.Task, asyncio.Task, Slot]:
    """`running` on the pool's only child, `behind` sent into that child's pipe behind it."""
    pool.pipeline = True
    started, sent = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(pool.run(running, started.set))
    await within(started.wait())
    second = asyncio.create_task(pool.run(behind, on_sent=sent.set))
    await within(sent.wait())
    [slot] = pool.slots
    assert slot.job == running and slot.queued is not None and slot.queued.job == behind
    return first, second, slot


def test_a_busy_child_runs_the_jobs_queued_behind_it_in_order_and_the_gaps_are_measured(tmp_path):
    async def body():
        async with started_pool(1) as pool:
            gaps: list[float] = []
            pool.on_idle_gap = gaps.append
            await warm_up(pool)
            pool.pipeline = True
            outcomes = await within(asyncio.gather(*(pool.run(job("math", f"{n} * 2", f"t{n}"))
                                                     for n in range(20))))
            assert outcomes == [Outcome(S.SUCCEEDED, str(n * 2).encode()) for n in range(20)]
            assert len(gaps) == 19 and min(gaps) >= 0.0  # every job but the first was waiting
            assert pool.restarts == 0
    run(body)


def test_a_kill_of_the_running_job_returns_the_queued_one_to_the_next_child(tmp_path):
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            first, second, slot = await queued_behind(pool, job("test.sleep", "30", "doomed"),
                                                      job("test.echo", "survivor", "queued"))
            slot.kill(Outcome(S.TIMED_OUT, error="killed while another job was queued behind it"))
            assert (await within(first, PROMPT_S)).state is S.TIMED_OUT
            assert await within(second, PROMPT_S) == Outcome(S.SUCCEEDED, b"survivor")
            assert pool.restarts == 1
    run(body)


async def a_queued_job_kills_its_child(tmp_path, replies_read_after_the_death: bool) -> None:
    """An innocent job runs; the culprit, queued behind it, kills the child. The innocent
    one succeeds, the culprit ends CRASHED and blamed, and the next job runs."""
    async with started_pool(1) as pool:
        await warm_up(pool)
        gate = tmp_path / "gate"
        first, second, slot = await queued_behind(pool, gated(gate, "innocent"), job("test.exit", "3", "culprit"))
        if replies_read_after_the_death:
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())
        gate.touch()
        assert (await within(first, PROMPT_S)).state is S.SUCCEEDED
        crashed = await within(second, PROMPT_S)
        assert crashed.state is S.CRASHED and "culprit" in crashed.error and "code 3" in crashed.error
        assert await within(pool.run(job("test.echo", "after"))) == Outcome(S.SUCCEEDED, b"after")


def test_a_queued_job_that_kills_its_child_is_blamed_not_the_one_before(tmp_path):
    run(a_queued_job_kills_its_child, tmp_path, False)


def test_a_queued_job_whose_child_dies_before_its_start_is_seen_still_gets_its_outcome(tmp_path):
    """The order a loaded supervisor can see it in (CI, next to a CPU hog): the child's
    reply to the first job is read only once the child is dead, so the queued job starts
    and ends (CRASHED) in that one step, before its caller resumes. Its caller must still
    get that outcome. Here the pool stops reading the pipe before the gate opens, which
    forces the order that the loop's event order otherwise leaves to chance."""
    run(a_queued_job_kills_its_child, tmp_path, True)


def test_a_cancel_of_a_queued_job_ends_it_cancelled_and_spares_the_running_one(tmp_path):
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            gate = tmp_path / "gate"
            first, second, _slot = await queued_behind(pool, gated(gate, "running"),
                                                       job("test.sleep", "30", "unwanted"))
            assert pool.kill_task("unwanted", Outcome(S.CANCELLED, error="cancelled by request"))
            gate.touch()
            assert (await within(first, PROMPT_S)).state is S.SUCCEEDED
            assert await within(second, PROMPT_S) == Outcome(S.CANCELLED, error="cancelled by request")
            assert await within(pool.run(job("test.echo", "after"))) == Outcome(S.SUCCEEDED, b"after")
    run(body)


def test_a_job_whose_caller_gave_up_while_it_was_queued_does_not_run_on(tmp_path):
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            gate = tmp_path / "gate"
            first, second, _slot = await queued_behind(pool, gated(gate, "running"),
                                                       job("test.sleep", "30", "abandoned"))
            second.cancel()
            gate.touch()
            assert (await within(first, PROMPT_S)).state is S.SUCCEEDED
            # killed as it started: the next job gets a fresh child, not one busy for 30 s
            assert await within(pool.run(job("test.echo", "next")), PROMPT_S) == Outcome(S.SUCCEEDED, b"next")
            assert pool.restarts == 1
    run(body)


def test_a_child_over_its_idle_rss_bound_is_recycled_even_while_jobs_keep_coming():
    """Its RSS after each task comes in the reply: with a job always queued behind the
    running one the child is never idle, and must still be retired (after the job already
    queued in it), not kept for as long as work keeps coming."""
    async def body():
        pool = Pool(1, "forkserver", max_idle_rss_mb=1)  # any child is over 1 MiB
        await pool.start()
        try:
            pool.pipeline = True
            outcomes = await within(asyncio.gather(*(pool.run(job("test.pid", "", f"t{n}")) for n in range(3))))
            assert {outcome.state for outcome in outcomes} == {S.SUCCEEDED}
            first, second, third = (outcome.result for outcome in outcomes)
            assert first == second != third  # the queued job ran on it, then a fresh child
        finally:
            await within(pool.stop(), PROMPT_S)
    run(body)
