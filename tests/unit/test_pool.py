"""The worker's process pool, with real child processes running the qm-testtasks plugin."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import psutil
import pytest

from qm.states import TaskState
from qm.worker.pool import Job, Outcome, Pool, Slot
from tests.time_limits import EARLY_S, LATE_S
from tests.unit.aio import run, within

S = TaskState
#: Bound on waiting for something that should be prompt (a kill, a crash report).
PROMPT_S = 10.0


@contextlib.asynccontextmanager
async def started_pool(procs: int = 2, start_method: str = "forkserver"):
    pool = Pool(procs, start_method)
    await pool.start()
    try:
        yield pool
    finally:
        await within(pool.stop(), PROMPT_S)


def job(task_type: str, payload: str | bytes = "", task_id: str = "t") -> Job:
    return Job(task_id, task_type, payload.encode() if isinstance(payload, str) else payload)


async def start_job(pool: Pool, the_job: Job) -> tuple[asyncio.Task, Slot]:
    """Start a job; return its run() task and the slot running it, once a child has it."""
    started: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_started() -> None:  # called the moment a child has the job
        [slot] = [slot for slot in pool.slots if slot.job == the_job]
        started.set_result(slot)

    task = asyncio.create_task(pool.run(the_job, on_started))
    return task, await within(started)


async def warm_up(pool: Pool) -> None:
    """Run a job on every child, so each has finished starting."""
    outcomes = await within(asyncio.gather(*(pool.run(job("test.pid")) for _ in pool.slots)))
    assert {outcome.state for outcome in outcomes} == {S.SUCCEEDED}


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_jobs_run_concurrently_with_correct_outcomes(start_method):
    async def body():
        async with started_pool(2, start_method) as pool:
            outcomes = await within(asyncio.gather(
                pool.run(job("test.echo", "hello")),
                pool.run(job("math", "1 + 2 * 5")),
                pool.run(job("test.fail", "boom")),
                pool.run(job("test.echo", "héllo wörld")),
                pool.run(job("math", "2 ** 100")),
            ))
            assert outcomes[0] == Outcome(S.SUCCEEDED, b"hello")
            assert outcomes[1] == Outcome(S.SUCCEEDED, b"11")
            assert outcomes[2].state is S.FAILED and outcomes[2].error.startswith("RuntimeError: boom")
            assert outcomes[3] == Outcome(S.SUCCEEDED, "héllo wörld".encode())
            assert outcomes[4] == Outcome(S.SUCCEEDED, str(2 ** 100).encode())
            assert pool.restarts == 0
    run(body)


def test_both_children_work_at_once():
    async def body():
        async with started_pool(2) as pool:
            await warm_up(pool)
            first, first_slot = await start_job(pool, job("test.sleep", "30", "a"))
            second, second_slot = await start_job(pool, job("test.sleep", "30", "b"))
            assert first_slot is not second_slot and not first.done()  # no wait for the first
            assert pool.slots[0].job is not None and pool.slots[1].job is not None
        first.cancel()  # stop() killed both children
        second.cancel()
    run(body)


def test_more_jobs_than_children_all_succeed():
    async def body():
        async with started_pool(2) as pool:
            outcomes = await within(asyncio.gather(
                *(pool.run(job("test.sleep", "0.5", f"t{i}")) for i in range(4))))
            assert outcomes == [Outcome(S.SUCCEEDED, b"0.5")] * 4
    run(body)


def test_an_outcome_carries_the_run_time_by_the_childs_clock():
    """From the child taking the job to its reply: at least what the task slept, at most
    what the caller waited; a killed task never replied, so it has none."""
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            t0 = time.monotonic()
            slept = await within(pool.run(job("test.sleep", "0.2")))
            waited_s = time.monotonic() - t0
            assert slept == Outcome(S.SUCCEEDED, b"0.2")
            assert slept.run_s is not None and 0.2 <= slept.run_s <= waited_s
            task, slot = await start_job(pool, job("test.sleep", "30", "killed"))
            slot.kill(Outcome(S.CANCELLED, error="cancelled"))
            killed = await within(task, PROMPT_S)
            assert killed.state is S.CANCELLED and killed.run_s is None
    run(body)


def test_raising_task_fails_with_exception_text_and_child_survives():
    async def body():
        async with started_pool(1) as pool:
            failed = await within(pool.run(job("test.fail", "boom")))
            assert failed.state is S.FAILED
            assert failed.error.splitlines()[0] == "RuntimeError: boom"
            assert "qm_testtasks" in failed.error  # where it failed, from the traceback
            assert await within(pool.run(job("test.echo", "next"))) == Outcome(S.SUCCEEDED, b"next")
            assert pool.restarts == 0
    run(body)


def test_invalid_payload_in_the_child_fails_naming_payload():
    async def body():
        async with started_pool(1) as pool:
            outcome = await within(pool.run(job("math", "1 +")))
            assert outcome.state is S.FAILED and outcome.error.startswith("MathError: payload:")
            bad_utf8 = await within(pool.run(job("test.echo", b"\xff\xfe")))
            assert bad_utf8.state is S.FAILED and "payload" in bad_utf8.error
    run(body)


def test_unknown_task_type_in_child_fails_as_not_installed():
    async def body():
        async with started_pool(1) as pool:
            outcome = await within(pool.run(job("no.such.type", "x")))
            assert outcome.state is S.FAILED
            assert "'no.such.type' is not installed" in outcome.error and "math" in outcome.error
    run(body)


def test_task_exiting_the_process_crashes_and_the_child_is_replaced():
    async def body():
        async with started_pool(2) as pool:
            crashed = await within(pool.run(job("test.exit", "3", "doomed")))
            assert crashed.state is S.CRASHED
            assert "code 3" in crashed.error and "doomed" in crashed.error and "test.exit" in crashed.error
            assert pool.restarts == 1
            assert await within(pool.run(job("test.echo", "after"))) == Outcome(S.SUCCEEDED, b"after")
            assert all(slot.alive and slot.process.is_alive() for slot in pool.slots)
    run(body)


def test_a_task_writing_garbage_on_its_pipe_crashes_and_the_child_is_replaced():
    """The pipe carries marshalled tuples, never unpickled: bytes that are not a reply kill
    the child (its later replies cannot be trusted) and end its task CRASHED."""
    async def body():
        async with started_pool(2) as pool:
            garbled = await within(pool.run(job("test.garble_pipe", "60", "scribbler")), PROMPT_S)
            assert garbled.state is S.CRASHED and "not a reply" in garbled.error
            assert pool.restarts == 1
            assert await within(pool.run(job("test.echo", "after"))) == Outcome(S.SUCCEEDED, b"after")
            assert all(slot.alive and slot.process.is_alive() for slot in pool.slots)
    run(body)


def test_child_killed_from_outside_crashes_with_sigkill_and_pool_keeps_working():
    async def body():
        async with started_pool(2) as pool:
            await warm_up(pool)
            running, slot = await start_job(pool, job("test.sleep", "30", "victim"))
            os.kill(slot.process.pid, signal.SIGKILL)
            crashed = await within(running, PROMPT_S)
            assert crashed.state is S.CRASHED and "SIGKILL" in crashed.error and "victim" in crashed.error
            assert pool.restarts == 1
            assert pool.slots[slot.index] is not slot
            outcomes = await within(asyncio.gather(pool.run(job("math", "6 * 7")), pool.run(job("math", "1"))))
            assert outcomes == [Outcome(S.SUCCEEDED, b"42"), Outcome(S.SUCCEEDED, b"1")]
    run(body)


def test_slot_kill_ends_the_job_with_the_chosen_outcome():
    async def body():
        async with started_pool(2) as pool:
            await warm_up(pool)
            running, slot = await start_job(pool, job("test.sleep", "30"))
            old_pid = slot.process.pid
            slot.kill(Outcome(S.TIMED_OUT, error="x"))
            assert await within(running, PROMPT_S) == Outcome(S.TIMED_OUT, error="x")
            assert not psutil.pid_exists(old_pid)
            replacement = pool.slots[slot.index]
            assert replacement is not slot and replacement.alive and replacement.process.pid != old_pid
            assert pool.restarts == 1
            assert await within(pool.run(job("test.echo", "ok"))) == Outcome(S.SUCCEEDED, b"ok")
    run(body)


def test_hard_deadline_ends_a_task_that_ignores_signals_at_its_limit():
    """The time a task gets is its limit: not less, and not much more (the kill lands
    within ~50 ms; LATE_S leaves room for a loaded machine), though it would spin 60 s."""
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            limit_s = 1.0
            stubborn = Job("t", "test.stubborn", b"60", timeout_s=limit_s, soft_timeout_s=limit_s / 2)
            started: list[float] = []
            outcome = await within(pool.run(stubborn, lambda: started.append(time.monotonic())), PROMPT_S)
            ran_s = time.monotonic() - started[0]
            assert outcome.state is S.TIMED_OUT and "time limit of 1 s" in outcome.error, outcome
            assert limit_s - EARLY_S <= ran_s <= limit_s + LATE_S, f"killed after {ran_s:.3f} s"
            assert await within(pool.run(job("test.echo", "next"))) == Outcome(S.SUCCEEDED, b"next")
    run(body)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_slot_kill_right_after_start_is_not_lost(start_method):
    """A kill that lands while the child is still starting must still end the job."""
    async def body():
        async with started_pool(1, start_method) as pool:
            running, slot = await start_job(pool, job("test.sleep", "30"))
            slot.kill(Outcome(S.TIMED_OUT, error="too slow"))
            assert await within(running, PROMPT_S) == Outcome(S.TIMED_OUT, error="too slow")
    run(body)


def test_kill_of_idle_slot_does_nothing():
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            pool.slots[0].kill(Outcome(S.TIMED_OUT, error="x"))
            assert await within(pool.run(job("test.echo", "still here"))) == Outcome(S.SUCCEEDED, b"still here")
            assert pool.restarts == 0
    run(body)


def test_children_run_in_their_own_session():
    async def body():
        async with started_pool(2) as pool:
            outcomes = await within(asyncio.gather(pool.run(job("test.pid")), pool.run(job("test.pid"))))
            pids = {int(outcome.result) for outcome in outcomes}
            assert pids == {slot.process.pid for slot in pool.slots}
            for pid in pids:
                assert os.getsid(pid) == pid and os.getpgid(pid) == pid
            assert os.getsid(0) not in pids
    run(body)


def test_stop_leaves_no_child_alive_even_with_a_job_running():
    async def body():
        pool = Pool(2, "forkserver")
        await pool.start()
        await warm_up(pool)
        running, _slot = await start_job(pool, job("test.sleep", "30"))
        processes = [slot.process for slot in pool.slots]
        await within(pool.stop(), PROMPT_S)
        running.cancel()
        for process in processes:
            assert not process.is_alive()
            assert not psutil.pid_exists(process.pid)
    run(body)


def test_stop_of_idle_pool_lets_children_exit():
    async def body():
        pool = Pool(2, "forkserver")
        await pool.start()
        await warm_up(pool)
        await within(pool.stop(), PROMPT_S)
        assert [slot.process.exitcode for slot in pool.slots] == [0, 0]  # exited cleanly, not killed
    run(body)


def test_kill_racing_the_reply_does_not_crash_the_next_job():
    """The killed child already replied: its slot must not take the next job while dying."""
    async def body():
        async with started_pool(1) as pool:
            await warm_up(pool)
            first_job, killed = job("test.echo", "first", "a"), []

            def kill_once_replied() -> None:  # runs inside run(), before the loop sees the reply
                [slot] = [slot for slot in pool.slots if slot.job == first_job]
                assert slot.conn.poll(PROMPT_S)  # the reply is in the pipe (blocks the loop on purpose)
                slot.kill(Outcome(S.TIMED_OUT, error="too late"))
                killed.append(slot)

            first = asyncio.create_task(pool.run(first_job, kill_once_replied))
            second = asyncio.create_task(pool.run(job("test.echo", "second", "b")))
            assert (await within(first, PROMPT_S)).state in (S.SUCCEEDED, S.TIMED_OUT)
            assert await within(second, PROMPT_S) == Outcome(S.SUCCEEDED, b"second")
            assert killed and pool.slots[0] is not killed[0] and pool.restarts == 1
    run(body)


def test_procfs_walks_a_process_tree_from_the_top_without_scanning_the_host():
    import subprocess
    import sys

    from qm.worker import procfs

    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; print(1, flush=True); time.sleep(60)'],"
              " stdout=subprocess.PIPE)\n"
              "child.stdout.readline()\n"  # the grandchild is a running interpreter, not a fresh fork
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        grandchild = int(parent.stdout.readline())
        assert procfs.descendants(os.getpid()).count(parent.pid) == 1
        assert set(procfs.descendants(parent.pid)) == {grandchild}
        assert procfs.rss_bytes(parent.pid) > 1024 * 1024  # a Python interpreter
        # The tree counts the grandchild too (both still starting up: sizes move, so no equality).
        assert procfs.tree_rss_bytes(parent.pid) > procfs.rss_bytes(parent.pid) + 1024 * 1024
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the grandchild too
        parent.wait()
    assert procfs.rss_bytes(parent.pid) == 0 and procfs.descendants(parent.pid) == []


def test_procfs_reads_a_file_longer_than_one_read_whole(tmp_path):
    from qm.worker import procfs

    long = tmp_path / "listing"
    long.write_bytes(b"".join(b"%d " % n for n in range(3 * procfs.READ_CHUNK_BYTES)))
    assert procfs.read_proc_file(str(long)) == long.read_bytes()
    exact = tmp_path / "exact"
    exact.write_bytes(b"7" * procfs.READ_CHUNK_BYTES)  # a full first read: the next one finds the end
    assert procfs.read_proc_file(str(exact)) == exact.read_bytes()


def test_procfs_has_children_sees_a_child_of_any_thread_and_reaps_nothing():
    """In a fresh interpreter (this one may have children of other tests): none, then a
    child started by a second thread, then that child exited but not reaped (a zombie is
    still a child to kill or reap), then reaped by its owner, which still gets its status."""
    import subprocess
    import sys

    script = (
        "import subprocess, sys, threading, time\n"
        "from qm.worker import procfs\n"
        "print(procfs.has_children())\n"
        "started = []\n"
        "runner = threading.Thread(target=lambda: started.append(subprocess.Popen([sys.executable, '-c', 'pass'])))\n"
        "runner.start(); runner.join()\n"
        "print(procfs.has_children())\n"
        "deadline = time.monotonic() + 30\n"  # a bound, not a pace: the child only has to exit
        "while open(f'/proc/{started[0].pid}/stat').read().split(')')[-1].split()[0] != 'Z':\n"
        "    assert time.monotonic() < deadline, 'the child never exited'\n"
        "    time.sleep(0.01)\n"
        "print(procfs.has_children())\n"
        "print(started[0].wait())\n"
        "print(procfs.has_children())\n"
    )
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                           check=True).stdout.split()
    assert lines == ["False", "True", "True", "0", "False"]


def test_own_statm_reads_this_process_memory_each_time():
    from qm.worker import procfs

    statm = procfs.OwnStatm()
    before = statm.rss_bytes()
    held = bytearray(64 * 1024 * 1024)  # zero-filled by the allocator: touched, so resident
    try:
        assert statm.rss_bytes() >= before + 48 * 1024 * 1024
        assert abs(statm.rss_bytes() - procfs.rss_bytes(os.getpid())) < 8 * 1024 * 1024
        assert statm.vms_bytes() >= statm.rss_bytes()
    finally:
        del held


def test_a_task_that_returns_leaves_no_subprocess_running():
    """A subprocess the task left running (started from one of its own threads) is killed
    before the task's outcome comes back, and the child goes on to the next task."""
    async def body():
        async with started_pool(1) as pool:
            outcome = await within(pool.run(job("test.leave_behind", "60")))
            assert outcome.state is S.SUCCEEDED, outcome
            left = int(outcome.result)
            deadline = time.monotonic() + PROMPT_S  # SIGKILL was sent; dying takes a moment
            while _running(left):
                assert time.monotonic() < deadline, f"the task's subprocess {left} still runs"
                await asyncio.sleep(0.01)
            assert await within(pool.run(job("test.echo", "next"))) == Outcome(S.SUCCEEDED, b"next")
    run(body)


def _running(pid: int) -> bool:
    """Alive and not a zombie (gone altogether, reaped by its parent, counts as ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
