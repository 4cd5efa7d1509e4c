"""A run's start is announced (RUNNING event) only once it lasts worker.running_event_delay_s;
a shorter run's start rides with its outcome event (issue 9: one event per trivial task).
Real pool children, the in-memory broker: what the worker publishes on qm.events is read
from a queue bound to that exchange, as a server's events queue is."""
from __future__ import annotations

import asyncio
import time

from qm.broker import topology
from qm.messages import TaskEvent
from qm.states import TaskState
from tests.unit.aio import run
from tests.unit.harness import records_until_terminal, states, submit_and_wait, system

S = TaskState
TAP = "test.events-tap"


async def tap(parts) -> tuple[list[TaskEvent], dict[int, float]]:
    """Every event the worker publishes from now on, decoded, in order; and when the tap
    had each (wall clock, by id of the event)."""
    seen: list[TaskEvent] = []
    received_at_s: dict[int, float] = {}
    await parts.broker.declare_queue(TAP)
    await parts.broker.bind_queue(TAP, topology.EVENTS_EXCHANGE)

    def on_delivery(delivery) -> None:
        for event in TaskEvent.decode_all(delivery.body):  # one event, or a pack of them
            seen.append(event)
            received_at_s[id(event)] = time.time()
        parts.broker.ack(delivery)

    await parts.broker.consume(TAP, on_delivery, prefetch=100)
    return seen, received_at_s


async def until(condition, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def status_once(parts, task_id: str, condition, timeout_s: float = 30.0):
    """The server's record of the task once `condition(record)` holds (bounded)."""
    async with asyncio.timeout(timeout_s):
        while not condition(record := await parts.service.status(task_id)):
            await asyncio.sleep(0.01)
    return record


def test_a_quick_run_is_one_event_and_still_counts_as_started(tmp_path):
    # A delay no run of "1 + 2 * 5" reaches, however loaded the machine (50 ms could be).
    async def body():
        async with system(tmp_path, running_event_delay_s=30.0) as parts:
            events, _ = await tap(parts)
            seen = await submit_and_wait(parts.service, "math", b"1 + 2 * 5")
            assert states(seen) == [S.RUNNING, S.SUCCEEDED]  # followers still see it start
            await until(lambda: len(events) >= 1)
            [outcome] = [e for e in events if e.task_id == seen[-1].task_id]
            assert outcome.state is S.SUCCEEDED and outcome.started_at_s is not None
            done = await parts.service.status(seen[-1].task_id)
            assert (done.result, done.starts, done.attempts, done.worker) == (b"11", 1, 1, "w1")
            assert done.created_at <= done.started_at == outcome.started_at_s <= done.finished_at
    run(body)


def test_a_long_run_is_announced_while_it_runs(tmp_path):
    async def body():
        async with system(tmp_path, running_event_delay_s=0.05) as parts:
            events, received_at_s = await tap(parts)
            record = await parts.service.submit("test.sleep", b"1.0")
            await until(lambda: any(e.task_id == record.task_id for e in events))
            first = events[0]
            assert (first.state, first.started_at_s) == (S.RUNNING, None)
            # told after the delay, but dated at the start: the run's time is not cut short
            assert received_at_s[id(first)] - first.at_s >= 0.045
            running = await status_once(parts, record.task_id, lambda r: r.state is not S.QUEUED)
            assert running.state is S.RUNNING and running.starts == 1  # seen running before it ends
            updates: asyncio.Queue = asyncio.Queue()
            parts.service.hub.follow(record.task_id, updates)
            *_, done = await records_until_terminal(updates, {record.task_id})
            assert (done.state, done.starts, done.started_at) == (S.SUCCEEDED, 1, running.started_at)
            await until(lambda: len(events) == 2)
            assert [(e.state, e.started_at_s) for e in events] == [(S.RUNNING, None), (S.SUCCEEDED, None)]
    run(body)


def test_no_delay_announces_every_start_at_once(tmp_path):
    async def body():
        async with system(tmp_path, running_event_delay_s=0.0) as parts:
            events, _ = await tap(parts)
            seen = await submit_and_wait(parts.service, "math", b"2 + 2")
            await until(lambda: len(events) == 2)
            assert [(e.state, e.started_at_s) for e in events] == [(S.RUNNING, None), (S.SUCCEEDED, None)]
            assert states(seen) == [S.RUNNING, S.SUCCEEDED]
    run(body)


def test_a_task_reporting_progress_is_announced_before_its_first_report(tmp_path):
    """The store takes progress only while a task is RUNNING: announcing at the first
    report keeps it, however short the run (here delayed 60 s: only the report can announce)."""
    async def body():
        async with system(tmp_path, running_event_delay_s=60.0) as parts:
            events, _ = await tap(parts)
            record = await parts.service.submit("test.progress", b"2:0.05")
            updates: asyncio.Queue = asyncio.Queue()
            parts.service.hub.follow(record.task_id, updates)
            await records_until_terminal(updates, {record.task_id})
            await until(lambda: any(e.state.terminal for e in events))
            assert events[0].state is S.RUNNING and events[0].progress is None  # before any report
            assert any(e.progress is not None for e in events)
            [outcome] = [e for e in events if e.state.terminal]  # (a report may be published after it)
            assert outcome.started_at_s is None  # announced already
            done = await parts.service.status(record.task_id)
            assert (done.state, done.result, done.starts) == (S.SUCCEEDED, b"done 2", 1)
            assert done.progress >= 0.5  # the first report was kept (the last may come after the outcome)
    run(body)


def test_after_long_runs_every_start_is_announced_at_once(tmp_path):
    """Recent runs longer than the delay: a start would be announced anyway, so it is told
    at once (in the same batch as the outcome before it), even the start of a quick run."""
    async def body():
        async with system(tmp_path, running_event_delay_s=0.1) as parts:
            events, _ = await tap(parts)
            await submit_and_wait(parts.service, "test.sleep", b"0.3")  # the mean run is now 0.3 s
            seen = await submit_and_wait(parts.service, "math", b"3 * 3")
            quick = seen[-1].task_id
            await until(lambda: any(e.task_id == quick and e.state.terminal for e in events))
            assert [(e.state, e.started_at_s) for e in events if e.task_id == quick] == [
                (S.RUNNING, None), (S.SUCCEEDED, None)]
    run(body)


def test_a_start_announced_in_the_turn_its_run_ends_still_goes_out_first(tmp_path, monkeypatch):
    """The announcement's timer may fire in the loop turn that reads the run's outcome (a
    busy supervisor, a run of about the delay). Simulated exactly: the timer goes off as the
    run's end asks for the unannounced start. The RUNNING event must still go out before
    the outcome, or the servers drop it as stale and the task ends without a start time."""
    from qm.worker.announce import StartAnnouncement

    def end_as_the_timer_fires(self):
        if self._timer is not None:  # the run ended before its announcement: it fires now
            self._timer.cancel()
            self._timer = None
            since_s, self._since_s = self._since_s, None
            self._publish(since_s)
        return None

    monkeypatch.setattr(StartAnnouncement, "end", end_as_the_timer_fires)

    async def body():
        async with system(tmp_path, running_event_delay_s=30.0) as parts:
            events, _ = await tap(parts)
            seen = await submit_and_wait(parts.service, "math", b"6 * 7")
            task_id = seen[-1].task_id
            await until(lambda: sum(e.task_id == task_id for e in events) == 2)
            assert [(e.state, e.started_at_s is None) for e in events] == [(S.RUNNING, True), (S.SUCCEEDED, True)]
            assert states(seen) == [S.RUNNING, S.SUCCEEDED]
            done = await parts.service.status(task_id)
            assert (done.result, done.starts) == (b"42", 1)
            assert done.started_at is not None and done.started_at <= done.finished_at
    run(body)
