"""Periodic schedules without a network: cron and interval ticks (qm/schedules.py), the
missed-ticks policies on a fake clock, and the server's scheduler (qm/server/scheduler.py)
over MemoryBroker and a real SQLite store: one task per tick, through the submit path."""
from __future__ import annotations

import datetime

import pytest

from qm import schedules
from qm.broker.memory import MemoryBroker
from qm.errors import ScheduleNotFound, ValidationError
from qm.messages import TaskMessage
from qm.registry import discover
from qm.schedules import COALESCE, SKIP, When, decide
from qm.server.scheduler import tick_key
from qm.server.service import TaskService
from qm.server.store import Store
from qm.server.submission import Submission
from qm.states import TaskState
from tests.unit.aio import run

#: 2026-01-05 10:00:00 UTC, a Monday in winter (Paris is UTC+1).
T0 = datetime.datetime(2026, 1, 5, 10, 0, 0, tzinfo=datetime.timezone.utc).timestamp()


# -- when a schedule ticks ------------------------------------------------------------------

@pytest.mark.parametrize("cron, field", [
    ("61 * * * *", "field 1 (minute)"),
    ("* 24 * * *", "field 2 (hour)"),
    ("* * 0 * *", "field 3 (day of month)"),
    ("* * * 13 *", "field 4 (month)"),
    ("* * * * 8", "field 5 (day of week)"),
    ("60 * * * * *", "field 1 (second)"),
    ("* * * *", "has 4 fields"),
    ("* * * * * * *", "has 7 fields"),
    ("@often", "unknown alias"),
    ("0 0 30 2 *", "never matches"),
])
def test_a_bad_cron_expression_is_refused_naming_the_field(cron, field):
    with pytest.raises(ValidationError) as refused:
        When(cron=cron).check()
    assert refused.value.field == "cron" and field in str(refused.value)


@pytest.mark.parametrize("when, field", [
    (When(), "cron"),
    (When(cron="* * * * *", every_s=5), "cron"),
    (When(every_s=0.5), "every_s"),
    (When(every_s=float("nan")), "every_s"),
    (When(cron="* * * * *", timezone="Mars/Olympus"), "timezone"),
])
def test_when_needs_exactly_one_valid_rule(when, field):
    with pytest.raises(ValidationError) as refused:
        when.check()
    assert refused.value.field == field


def test_five_fields_tick_on_minutes_six_fields_on_seconds_first():
    assert When(cron="*/5 * * * *").check().next_after(T0) == T0 + 300
    every_10_s = When(cron="*/10 * * * * *").check()
    assert every_10_s.next_after(T0) == T0 + 10 and every_10_s.next_after(T0 + 10.5) == T0 + 20
    assert When(cron="30 * * * * *").check().next_after(T0) == T0 + 30  # second 30 of each minute
    assert When(cron="@hourly").check().next_after(T0) == T0 + 3600


def test_cron_is_read_in_its_time_zone_and_utc_by_default():
    assert When(cron="0 11 * * *").check().next_after(T0) == T0 + 3600  # 11:00 UTC
    paris = When(cron="0 11 * * *", timezone="Europe/Paris").check()
    assert paris.next_after(T0) == T0 + 86400  # 11:00 Paris is 10:00 UTC: next day's


def test_every_ticks_on_whole_multiples_of_its_interval():
    every_minute = When(every_s=60).check()
    assert every_minute.next_after(T0 + 1) == T0 + 60 and every_minute.next_after(T0) == T0 + 60
    assert every_minute.latest_at_or_before(T0 + 59) == T0 and every_minute.latest_at_or_before(T0 + 60) == T0 + 60


def test_a_tick_on_time_fires_itself_under_either_policy():
    when = When(every_s=5).check()
    for policy in (COALESCE, SKIP):
        assert decide(when, T0, T0 + 0.2, policy, grace_s=1.0) == schedules.Decision(T0, 0, T0 + 5)


def test_coalesce_fires_the_latest_missed_tick_once():
    when = When(cron="*/5 * * * * *").check()
    assert decide(when, T0, T0 + 17.5, COALESCE) == schedules.Decision(T0 + 15, 3, T0 + 20)


def test_skip_fires_nothing_for_a_tick_later_than_the_grace():
    when = When(every_s=10).check()
    assert decide(when, T0, T0 + 32, SKIP, grace_s=1.0) == schedules.Decision(None, 4, T0 + 40)
    assert decide(when, T0, T0 + 30.5, SKIP, grace_s=1.0) == schedules.Decision(T0 + 30, 3, T0 + 40)


def test_tick_keys_name_the_schedule_and_the_tick_in_utc():
    assert tick_key("nightly", T0) == "schedule:nightly:2026-01-05T10:00:00.000Z"


# -- the server's scheduler, on a fake clock ------------------------------------------------

class Server:
    """A TaskService over MemoryBroker and SQLite, its scheduler driven by hand."""

    def __init__(self, tmp_path, **options) -> None:
        self.broker = MemoryBroker()
        self.store = Store(tmp_path / "server.db")
        self.service = TaskService(discover(), self.store, self.broker, max_payload_bytes=1000, **options)
        self.scheduler = self.service.scheduler

    async def __aenter__(self) -> Server:
        await self.broker.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.broker.close()
        await self.store.close()

    async def fired(self) -> list[TaskMessage]:
        """Messages published to the default work queue so far."""
        queue = self.broker._queues.get("qm.tasks.default", ())  # noqa: SLF001  (the double's own state)
        return [TaskMessage.decode(message.body) for message in queue]


MATH = Submission("math", b"6 * 7")


def test_each_tick_fires_one_task_through_the_submit_path(tmp_path):
    async def scenario():
        async with Server(tmp_path) as server:
            added = await server.scheduler.add("every-5", When(every_s=5), COALESCE, MATH, now_s=T0 + 1)
            assert added.next_fire_at == T0 + 5
            assert await server.scheduler.fire_due(T0 + 4) and await server.fired() == []
            for now in (T0 + 5.01, T0 + 5.02, T0 + 10.3):  # a second look at one tick fires nothing
                await server.scheduler.fire_due(now)
            messages = await server.fired()
            assert [m.payload for m in messages] == [b"6 * 7", b"6 * 7"]
            records = [await server.store.get(m.task_id) for m in messages]
            assert [r.idempotency_key for r in records] == [tick_key("every-5", T0 + 5), tick_key("every-5", T0 + 10)]
            assert {(r.state, r.schedule_id) for r in records} == {(TaskState.QUEUED, "every-5")}
            assert await server.store.unconfirmed() == []  # published and confirmed
            [listed], token = await server.scheduler.list("", 10)
            assert (listed.fires, listed.last_task_id, listed.last_tick_at, listed.next_fire_at, token) == (
                2, records[1].task_id, T0 + 10, T0 + 15, "")

    run(scenario)


def test_after_a_gap_coalesce_fires_once_and_skip_not_at_all(tmp_path):
    async def scenario():
        async with Server(tmp_path, schedule_grace_s=2.0) as server:
            await server.scheduler.add("c", When(every_s=5), COALESCE, MATH, now_s=T0)
            await server.scheduler.add("s", When(every_s=5), SKIP, MATH, now_s=T0)
            await server.scheduler.fire_due(T0 + 23)  # ticks 5, 10, 15, 20 all passed unfired
            [message] = await server.fired()
            record = await server.store.get(message.task_id)
            assert (record.schedule_id, record.idempotency_key) == ("c", tick_key("c", T0 + 20))
            coalesced, skipped = [await server.store.get_schedule(i) for i in ("c", "s")]
            assert (coalesced.fires, coalesced.missed_ticks, coalesced.next_fire_at) == (1, 3, T0 + 25)
            assert (skipped.fires, skipped.missed_ticks, skipped.next_fire_at) == (0, 4, T0 + 25)
            await server.scheduler.fire_due(T0 + 25.5)  # on time again: both fire
            assert len(await server.fired()) == 3

    run(scenario)


def test_a_schedule_is_validated_like_a_submit_and_added_once_per_id(tmp_path):
    async def scenario():
        async with Server(tmp_path) as server:
            add = server.scheduler.add
            for task, field in ((Submission("nope", b"1"), "type"), (Submission("math", b"1 +"), "payload"),
                                (Submission("math", b"1", queue="bad queue!"), "queue"),
                                (Submission("math", b"1", idempotency_key="k"), "task"),
                                (Submission("math", b"1", delay_s=5.0), "task")):
                with pytest.raises(ValidationError) as refused:
                    await add("x", When(every_s=5), COALESCE, task, now_s=T0)
                assert refused.value.field == field
            with pytest.raises(ValidationError, match="schedule_id"):
                await add("has space", When(every_s=5), COALESCE, MATH, now_s=T0)
            with pytest.raises(ValidationError, match="missed_ticks"):
                await add("x", When(every_s=5), "sometimes", MATH, now_s=T0)
            first = await add("x", When(every_s=5), COALESCE, MATH, now_s=T0)
            assert await add("x", When(every_s=5), COALESCE, MATH, now_s=T0 + 1) == first  # a retried add
            with pytest.raises(ValidationError, match="taken by another schedule"):
                await add("x", When(every_s=6), COALESCE, MATH, now_s=T0)
            assert (await server.scheduler.remove("x")).schedule_id == "x"
            with pytest.raises(ScheduleNotFound):
                await server.scheduler.remove("x")
            assert await server.scheduler.fire_due(T0 + 100) and await server.fired() == []

    run(scenario)


def test_the_store_holds_at_most_max_schedules(tmp_path):
    async def scenario():
        async with Server(tmp_path, max_schedules=2) as server:
            for name in ("a", "b"):
                await server.scheduler.add(name, When(every_s=5), COALESCE, MATH, now_s=T0)
            with pytest.raises(ValidationError, match="server.max_schedules"):
                await server.scheduler.add("c", When(every_s=5), COALESCE, MATH, now_s=T0)
            await server.scheduler.add("a", When(every_s=5), COALESCE, MATH, now_s=T0)  # the same again: fine
            page, token = await server.scheduler.list("", 1)
            assert [s.schedule_id for s in page] == ["a"] and token == "a"
            page, token = await server.scheduler.list(token, 1)
            assert [s.schedule_id for s in page] == ["b"] and token == ""

    run(scenario)


def test_a_task_its_publish_lost_after_the_claim_is_published_again_not_lost(tmp_path):
    async def scenario():
        async with Server(tmp_path) as server:
            await server.scheduler.add("p", When(every_s=5), COALESCE, MATH, now_s=T0)
            original = server.broker.publish
            failures = iter([True])

            async def refuse_once(*args, **kwargs):
                if args[0] == "qm.tasks" and next(failures, False):
                    from qm.errors import BrokerUnavailable
                    raise BrokerUnavailable("RabbitMQ went away after the commit")
                return await original(*args, **kwargs)

            server.broker.publish = refuse_once
            task_id = await server.scheduler.fire(await server.store.get_schedule("p"), T0 + 5.1)
            assert await server.fired() == [] and [r[0] for r in await server.store.unconfirmed()] == [task_id]
            await server.scheduler._publish_left_over()  # what the loop does next
            assert [m.task_id for m in await server.fired()] == [task_id]
            assert (await server.store.get_schedule("p")).fires == 1

    run(scenario)


def test_a_client_may_not_take_a_tick_key_and_fired_tasks_carry_the_request_digest(tmp_path):
    async def scenario():
        async with Server(tmp_path) as server:
            with pytest.raises(ValidationError) as refused:
                await server.service.submit("math", b"1", idempotency_key=tick_key("p", T0 + 5))
            assert refused.value.field == "idempotency_key"
            await server.scheduler.add("p", When(every_s=5), COALESCE, MATH, now_s=T0)
            task_id = await server.scheduler.fire(await server.store.get_schedule("p"), T0 + 5.1)
            record = await server.store.get(task_id)
            assert record.request_digest.startswith("v1:") and record.created_at == T0 + 5.1

    run(scenario)
