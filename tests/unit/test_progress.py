"""Progress from inside a task (issue 14, item 1): what qm.progress accepts, the
supervisor's rate limit (on a fake clock), the store's rule that a late report never
touches a terminal state, the wire format, and real pool children reporting."""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import sys
import threading

import pytest

import qm
import qm.client.common
from qm import task_progress
from qm.client import cli
from qm.client.common import status_from_proto
from qm.messages import TaskEvent
from qm.server.servicer import record_to_proto
from qm.server.store import Store, TaskRecord
from qm.states import TaskState
from qm.task_progress import DETAIL_MAX_BYTES, MESSAGE_MAX_CHARS, Progress
from qm.worker.jobs import ReplyKind, decode_reply
from qm.worker.pool import Job, Pool
from qm.worker.progress import ChildReporter, ProgressLimiter
from tests.unit.aio import Blocking, run, within

S = TaskState
T0 = 1_700_000_000.0
CODECS = {"math": "text"}
#: Bound on a pool starting, or a short task finishing, on a loaded machine.
PROMPT_S = 60.0


# -- qm.progress: input ------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan, math.inf])
def test_a_fraction_outside_0_to_1_is_refused_naming_it(fraction):
    with pytest.raises(ValueError, match="fraction must be from 0 to 1"):
        qm.progress(fraction)


@pytest.mark.parametrize("fraction", ["0.5", None, True])
def test_a_fraction_that_is_not_a_number_is_a_type_error(fraction):
    with pytest.raises(TypeError, match="fraction must be a number"):
        qm.progress(fraction)


def test_a_detail_json_cannot_encode_or_too_big_is_refused_with_the_limit():
    with pytest.raises(TypeError, match="JSON-encodable"):
        qm.progress(0.5, detail={"when": object()})
    with pytest.raises(ValueError, match=f"over the {DETAIL_MAX_BYTES}-byte limit"):
        qm.progress(0.5, detail={"rows": "x" * DETAIL_MAX_BYTES})
    with pytest.raises(TypeError, match="message must be a str"):
        qm.progress(0.5, message=42)


def test_a_long_message_is_cut_and_the_detail_kept_as_compact_json():
    update = task_progress.make(1, "m" * (MESSAGE_MAX_CHARS + 50), {"step": 3, "of": [1, 2]})
    assert update == Progress(1.0, "m" * MESSAGE_MAX_CHARS, '{"step":3,"of":[1,2]}')


def test_outside_a_worker_child_it_is_a_logged_no_op(caplog):
    caplog.set_level(logging.DEBUG, logger="qm.task_progress")
    assert qm.progress(0.25, "quarter") is None
    assert "outside a worker's task" in caplog.text


def test_inside_it_goes_to_the_installed_reporter():
    got: list[Progress] = []

    class Collect:
        def report(self, update: Progress) -> None:
            got.append(update)

    task_progress.install(Collect())
    try:
        qm.progress(0.5, "half", {"n": 1})
    finally:
        task_progress.install(None)
    assert got == [Progress(0.5, "half", '{"n":1}')]


# -- the supervisor's rate limit (fake clock, fake timers) --------------------------------

class FakeTimers:
    """call_later on a clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.pending: list[list] = []  # [due_s, callback, cancelled]

    def clock(self) -> float:
        return self.now_s

    def call_later(self, delay_s: float, callback):
        entry = [self.now_s + delay_s, callback, False]
        self.pending.append(entry)

        class Handle:
            def cancel(self) -> None:
                entry[2] = True

        return Handle()

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
        due = [entry for entry in self.pending if entry[0] <= self.now_s + 1e-9]
        self.pending = [entry for entry in self.pending if entry not in due]
        for _due_s, callback, cancelled in sorted(due, key=lambda entry: entry[0]):
            if not cancelled:
                callback()


def limited() -> tuple[ProgressLimiter, list[tuple[float, float]], FakeTimers]:
    timers = FakeTimers()
    sent: list[tuple[float, float]] = []  # (when, fraction)
    limiter = ProgressLimiter(lambda update: sent.append((timers.now_s, update.fraction)), timers.call_later,
                              timers.clock, interval_s=0.1)
    return limiter, sent, timers


def test_the_first_update_goes_out_at_once_and_a_burst_leaves_only_its_latest_at_the_window_end():
    limiter, sent, timers = limited()
    limiter.offer(Progress(0.1))
    assert sent == [(0.0, 0.1)]
    for fraction in (0.2, 0.3, 0.4):  # within the window: held, each replacing the last
        timers.advance(0.01)
        limiter.offer(Progress(fraction))
    assert sent == [(0.0, 0.1)]
    timers.advance(0.07)  # the window closes at 0.1 s: the trailing update, the latest
    assert sent == [(0.0, 0.1), (pytest.approx(0.1), 0.4)]
    assert limiter.coalesced == 2


def test_a_steady_stream_is_held_to_ten_a_second_and_the_last_is_never_lost():
    limiter, sent, timers = limited()
    for step in range(1, 1001):  # 1000 updates over 1 s
        limiter.offer(Progress(step / 1000))
        timers.advance(0.001)
    timers.advance(0.2)
    assert 10 <= len(sent) <= 11
    assert all(later - earlier >= 0.1 - 1e-9 for (earlier, _), (later, _) in zip(sent, sent[1:], strict=False))
    assert sent[-1][1] == 1.0  # the latest is always kept


def test_an_update_after_a_quiet_spell_goes_out_at_once():
    limiter, sent, timers = limited()
    limiter.offer(Progress(0.1))
    timers.advance(5.0)
    limiter.offer(Progress(0.2))
    assert [fraction for _, fraction in sent] == [0.1, 0.2]
    assert not timers.pending


def test_closing_drops_the_held_update_so_nothing_follows_the_outcome():
    limiter, sent, timers = limited()
    limiter.offer(Progress(0.1))
    limiter.offer(Progress(0.9))
    assert limiter.close() == 1
    timers.advance(1.0)
    limiter.offer(Progress(1.0))
    assert sent == [(0.0, 0.1)]


# -- the store: progress vs the lifecycle -------------------------------------------------

@pytest.fixture
def store(tmp_path):
    opened = Blocking(Store(tmp_path / "tasks.db"))  # its coroutines called as plain calls
    opened.insert(TaskRecord.queued("t1", "math", "default", "text", T0))
    yield opened
    opened.close()


def lifecycle(state: TaskState, at_s: float, attempt: int = 1) -> TaskEvent:
    return TaskEvent("t1", "math", "default", attempt, state, "w1", b"42" if state is S.SUCCEEDED else b"",
                     "", at_s)


def report(fraction: float, at_s: float, attempt: int = 1, message: str = "") -> TaskEvent:
    return TaskEvent("t1", "math", "default", attempt, S.RUNNING, "w1", at_s=at_s,
                     progress=Progress(fraction, message, '{"k":1}'))


def test_progress_of_the_running_attempt_is_stored_and_is_no_new_start(store):
    store.apply([lifecycle(S.RUNNING, T0 + 1)], CODECS)
    [changed] = store.apply([report(0.4, T0 + 2, message="step 2")], CODECS)
    assert (changed.state, changed.progress, changed.progress_message) == (S.RUNNING, 0.4, "step 2")
    stored = store.get("t1")
    assert stored == changed
    assert (stored.starts, stored.started_at, stored.updated_at) == (1, T0 + 1, T0 + 1)
    assert (stored.progress_detail_json, stored.progress_at) == ('{"k":1}', T0 + 2)


def test_a_report_arriving_after_success_leaves_the_terminal_state_alone(store):
    store.apply([lifecycle(S.RUNNING, T0 + 1), report(0.5, T0 + 2)], CODECS)
    store.apply([lifecycle(S.SUCCEEDED, T0 + 4)], CODECS)
    assert store.apply([report(0.9, T0 + 3), report(1.0, T0 + 5)], CODECS) == []
    final = store.get("t1")
    assert (final.state, final.result, final.progress, final.finished_at) == (S.SUCCEEDED, b"42", 0.5, T0 + 4)


def test_a_stale_report_changes_nothing_and_a_new_run_starts_from_zero(store):
    store.apply([lifecycle(S.RUNNING, T0 + 1), report(0.6, T0 + 3)], CODECS)
    assert store.apply([report(0.2, T0 + 2)], CODECS) == []  # older than the stored one
    assert store.apply([report(0.1, T0 + 4, attempt=2)], CODECS) == []  # attempt 2 has not started
    [restarted] = store.apply([lifecycle(S.RUNNING, T0 + 5)], CODECS)  # redelivered: run again
    assert (restarted.progress, restarted.progress_at, restarted.starts) == (0.0, None, 2)


def test_a_report_for_a_task_the_store_has_not_seen_running_is_ignored(store):
    assert store.apply([report(0.3, T0 + 1)], CODECS) == []  # still QUEUED
    assert store.get("t1").state is S.QUEUED


def test_progress_travels_the_wire_to_the_client_status(store):
    event = report(0.75, T0 + 2, message="three quarters")
    assert TaskEvent.decode(event.encode()) == event
    store.apply([lifecycle(S.RUNNING, T0 + 1), event], CODECS)
    status = status_from_proto(record_to_proto(store.get("t1")))
    assert (status.progress, status.progress_message, status.progress_detail) == (0.75, "three quarters", {"k": 1})
    data = status.to_dict()
    assert json.loads(json.dumps(data))["progress"] == 0.75 and data["progress_message"] == "three quarters"


def test_an_old_event_without_progress_decodes_as_a_state_change():
    event = lifecycle(S.RUNNING, T0)
    assert TaskEvent.decode(event.encode()).progress is None


# -- the child's reporter ------------------------------------------------------------------

def test_the_child_reporter_keeps_the_latest_and_drops_what_comes_after_its_task_ended():
    parent, child = multiprocessing.Pipe()
    reporter = ChildReporter(child, threading.Lock(), interval_s=0.01)
    reporter.begin("t1")
    workers = [threading.Thread(target=lambda: [reporter.report(Progress(n / 1000)) for n in range(1000)])
               for _ in range(3)]  # the task's threads report too
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(PROMPT_S)
    assert parent.poll(PROMPT_S)
    reporter.end()
    reporter.report(Progress(1.0, "after the end"))  # dropped: no task runs
    reporter.begin("t2")
    reporter.report(Progress(0.5, "next task"))
    got = []
    while not got or got[-1].value != "t2":
        assert parent.poll(PROMPT_S), got
        got.append(decode_reply(parent.recv_bytes()))
    assert {reply.kind for reply in got} == {ReplyKind.PROGRESS}
    assert [reply.value for reply in got[:-1]] == ["t1"] * (len(got) - 1)  # fewer than the 3,000 calls
    assert len(got) < 3000 and all(reply.progress.message != "after the end" for reply in got)
    assert got[-1].progress == Progress(0.5, "next task")


# -- real children ----------------------------------------------------------------------

def test_a_child_reports_in_order_before_its_outcome_and_spam_does_not_hold_it_up():
    async def scenario() -> tuple[list[Progress], list[Progress], TaskState, TaskState]:
        pool = Pool(1, "forkserver")
        await within(pool.start(), PROMPT_S)
        try:
            steps: list[Progress] = []
            outcome = await within(pool.run(Job("t-steps", "test.progress", b"4:0.15"),
                                            on_progress=steps.append), PROMPT_S)
            spam: list[Progress] = []
            spammed = await within(pool.run(Job("t-spam", "test.progress_spam", b"10000"),
                                            on_progress=spam.append), PROMPT_S)
            return steps, spam, outcome.state, spammed.state
        finally:
            await within(pool.stop(), PROMPT_S)

    steps, spam, state, spam_state = run(scenario, timeout_s=3 * PROMPT_S)
    assert state is S.SUCCEEDED and spam_state is S.SUCCEEDED
    fractions = [update.fraction for update in steps]
    assert fractions == sorted(fractions) and fractions[0] == 0.25 and len(fractions) >= 2
    assert steps[0] == Progress(0.25, "step 1", '{"step":1}')
    # The child coalesces: 10,000 calls are a handful of pipe messages, in order.
    assert 1 <= len(spam) < 10_000
    assert [update.fraction for update in spam] == sorted(update.fraction for update in spam)


# -- the CLI ------------------------------------------------------------------------------

def cli_status(state: TaskState, progress_at: float | None = None, progress: float = 0.0,
               message: str = "") -> qm.client.common.TaskStatus:
    return qm.client.common.TaskStatus("t1", "math", "default", state, 1, "42" if state is S.SUCCEEDED else None,
                                       "", "w1", T0, T0 + 1, None, T0 + 1, progress=progress,
                                       progress_message=message, progress_at=progress_at)


class WatchingClient:
    def __init__(self, statuses) -> None:
        self.statuses = statuses

    def watch(self, task_ids, timeout_s=None):
        return iter(self.statuses)

    def status(self, task_id):
        return self.statuses[-1]


WATCHED = [cli_status(S.RUNNING), cli_status(S.RUNNING, T0 + 2, 0.4, "step 2"),
           cli_status(S.RUNNING, T0 + 3, 0.8, "step 4"), cli_status(S.SUCCEEDED, T0 + 3, 0.8, "step 4")]


def test_qm_watch_prints_plain_lines_with_the_percentage_when_not_a_terminal(capsys):
    args = argparse.Namespace(task_ids=["t1"], wait_timeout=None, json=False)
    assert cli.cmd_watch(WatchingClient(WATCHED), args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "t1 RUNNING", "t1 RUNNING 40% step 2", "t1 RUNNING 80% step 4", "t1 SUCCEEDED 42"]


def test_qm_watch_draws_one_bar_line_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    args = argparse.Namespace(task_ids=["t1"], wait_timeout=None, json=False)
    assert cli.cmd_watch(WatchingClient(WATCHED), args) == 0
    out = capsys.readouterr().out
    bar_at_40 = "[" + "#" * 12 + "." * 18 + "]  40% step 2"
    assert f"{cli.CLEAR_LINE}t1 {bar_at_40}{cli.CLEAR_LINE}t1 [" in out  # redrawn in place
    assert out.endswith(f"{cli.CLEAR_LINE}{cli._change_line(WATCHED[-1])}\n")  # bar erased, then the outcome


def test_qm_status_json_and_text_show_progress(capsys):
    client = WatchingClient([cli_status(S.RUNNING, T0 + 2, 0.4, "step 2")])
    data = json.loads(printed(capsys, cli.cmd_status, client, task_id="t1", json=True))
    assert (data["progress"], data["progress_message"]) == (0.4, "step 2")
    assert data["progress_at"].startswith("2023-11-14T22:13:22")
    assert "progress  40% step 2" in printed(capsys, cli.cmd_status, client, task_id="t1", json=False)


def printed(capsys, command, client, **args) -> str:
    assert command(client, argparse.Namespace(**args)) == 0
    return capsys.readouterr().out
