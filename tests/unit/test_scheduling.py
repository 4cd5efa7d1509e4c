"""Delayed tasks: which submissions are refused and why, when they are due, where they
wait (delay tiers, never a worker), and that the reconciler leaves a task alone until it
is due. MemoryBroker and a real store; sweeps run at explicit times."""
from __future__ import annotations

import math

import pytest

from qm import scheduling
from qm.broker import topology
from qm.client.common import batch_requests, submit_request
from qm.errors import IdempotencyKeyReused, ValidationError
from qm.messages import TaskMessage
from qm.states import TaskState, supersedes
from tests.unit.aio import run, within
from tests.unit.harness import WORK_QUEUE, server, system
from tests.unit.test_service import take_messages

NOW_S = 1_800_000_000.0
DAY_S = 86400.0


@pytest.mark.parametrize(("delay_s", "not_before_s", "field", "words"), [
    (5.0, NOW_S + 5, "delay_s", "not both"),
    (-1.0, None, "delay_s", "non-negative"),
    (math.nan, None, "delay_s", "non-negative"),
    (math.inf, None, "delay_s", "non-negative"),
    (8 * DAY_S, None, "delay_s", "server.max_delay_s"),
    (None, NOW_S + 8 * DAY_S, "not_before", "server.max_delay_s"),
    (None, math.nan, "not_before", "must be a time"),
])
def test_a_bad_delay_is_refused_naming_the_field(delay_s, not_before_s, field, words):
    with pytest.raises(ValidationError) as refused:
        scheduling.due_at(delay_s, not_before_s, NOW_S, max_delay_s=7 * DAY_S)
    assert refused.value.field == field and words in refused.value.message


def test_due_times():
    assert scheduling.due_at(None, None, NOW_S) is None
    assert scheduling.due_at(0.0, None, NOW_S) is None  # no delay: runs now
    assert scheduling.due_at(2.5, None, NOW_S) == NOW_S + 2.5
    assert scheduling.due_at(None, NOW_S + 60, NOW_S) == NOW_S + 60
    assert scheduling.due_at(None, NOW_S - 3600, NOW_S) is None  # already past: runs now
    assert scheduling.due_at(7 * DAY_S, None, NOW_S, max_delay_s=7 * DAY_S) == NOW_S + 7 * DAY_S


def test_a_long_delay_hops_through_tiers_and_never_runs_early():
    assert scheduling.hop_tier_s(None, NOW_S) is None
    assert scheduling.hop_tier_s(NOW_S, NOW_S) is None              # due
    assert scheduling.hop_tier_s(NOW_S + 0.1, NOW_S) == 1           # late by < 1 s, never early
    assert scheduling.hop_tier_s(NOW_S + 0.7, NOW_S) == 1           # late by < 1 s, never early
    assert scheduling.hop_tier_s(NOW_S + 7, NOW_S) == 5             # then 2 s more
    assert scheduling.hop_tier_s(NOW_S + 3 * DAY_S, NOW_S) == 3600  # the largest tier, again and again


def test_scheduled_shows_queued_once_due_and_gives_way_to_the_first_attempt():
    assert scheduling.shown_state(TaskState.SCHEDULED, NOW_S + 1, NOW_S) is TaskState.SCHEDULED
    assert scheduling.shown_state(TaskState.SCHEDULED, NOW_S, NOW_S) is TaskState.QUEUED
    assert scheduling.shown_state(TaskState.RUNNING, NOW_S + 1, NOW_S) is TaskState.RUNNING
    assert supersedes(TaskState.SCHEDULED, 0, TaskState.RUNNING, 1)
    assert supersedes(TaskState.SCHEDULED, 0, TaskState.CANCELLED, 1)
    assert int(TaskState.SCHEDULED) == 10 and TaskState.of_number(10) is TaskState.SCHEDULED


def test_a_delayed_task_is_stored_scheduled_and_waits_in_a_delay_tier(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"1 + 1", delay_s=7.0)
            assert record.state is TaskState.SCHEDULED
            assert record.next_attempt_at == pytest.approx(record.created_at + 7.0)
            assert (await parts.store.get(record.task_id)).state is TaskState.SCHEDULED
            assert parts.broker.queue_depth(WORK_QUEUE) == 0
            [message] = await take_messages(parts.broker, topology.delay_tier_name(5), 1)
            assert message.not_before_s == pytest.approx(record.created_at + 7.0)
    run(body)


def test_a_refused_delay_stores_nothing(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            with pytest.raises(ValidationError) as refused:
                await parts.service.submit("math", b"1 + 1", delay_s=1.0, not_before_s=NOW_S)
            assert refused.value.field == "delay_s" and await parts.store.count() == 0
    run(body)


def test_the_reconciler_leaves_a_scheduled_task_alone_until_long_overdue(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"6 * 7", delay_s=600.0)
            due_s, after_s = record.next_attempt_at, parts.service.reconciler.after_s
            await take_messages(parts.broker, topology.delay_tier_name(600), 1)  # lost with a broker
            reconciler = parts.service.reconciler
            assert await reconciler.sweep(now_s=due_s - 1) == 0              # not due: its queue is empty
            assert await reconciler.sweep(now_s=due_s + after_s - 1) == 0   # due, but give it time
            assert await reconciler.sweep(now_s=due_s + after_s + 1) == 1
            [message] = await take_messages(parts.broker, WORK_QUEUE, 1)
            assert (message.task_id, message.attempt) == (record.task_id, 1)
            assert parts.service.metrics.reconciled.labels("SCHEDULED")._value.get() == 1
    run(body)


def test_a_worker_sends_an_early_task_back_to_a_delay_tier_without_running_it(tmp_path):
    async def body():
        async with system(tmp_path, procs=1) as parts:
            early = TaskMessage("early-1", "math", b"2 + 2", "default", not_before_s=NOW_S * 2)
            await parts.broker.publish(topology.TASKS_EXCHANGE, "default", early.encode(), early.headers())
            [held] = await take_messages(parts.broker, topology.delay_tier_name(3600), 1)
            assert (held.task_id, held.not_before_s) == ("early-1", NOW_S * 2)
            assert await parts.store.get("early-1") is None  # no event: it never ran
            assert parts.broker.queue_depth(WORK_QUEUE) == 0
            assert parts.supervisor.outcomes.metrics.delay_hops.labels("3600")._value.get() == 1
    run(body)


def test_a_cancelled_scheduled_task_is_cancelled(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("math", b"1 + 1", delay_s=30.0)
            cancelled = await within(parts.service.cancel(record.task_id))
            assert cancelled.state is TaskState.CANCELLED
    run(body)


def test_an_idempotency_key_covers_the_delay(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            first = await parts.service.submit("math", b"1 + 1", delay_s=30.0, idempotency_key="k")
            again = await parts.service.submit("math", b"1 + 1", delay_s=30.0, idempotency_key="k")
            assert again.task_id == first.task_id
            with pytest.raises(IdempotencyKeyReused):
                await parts.service.submit("math", b"1 + 1", delay_s=60.0, idempotency_key="k")
    run(body)


def test_a_client_request_carries_the_delay_it_was_given():
    assert not submit_request("math", "1").HasField("delay_s")
    assert not submit_request("math", "1").HasField("not_before")
    assert submit_request("math", "1", delay_s=2.5).delay_s == 2.5
    assert submit_request("math", "1", not_before=NOW_S + 0.25).not_before.ToNanoseconds() == int((NOW_S + 0.25) * 1e9)
    [first, second] = batch_requests([("math", "1"), ("math", "2", {"not_before": NOW_S})], {"delay_s": 5.0})
    assert first.delay_s == 5.0 and not first.HasField("not_before")
    assert second.HasField("not_before") and not second.HasField("delay_s")  # its own delay replaces the batch's
