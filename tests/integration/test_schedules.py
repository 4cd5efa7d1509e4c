"""Periodic schedules with real RabbitMQ and real processes (issue 14, item 2): the `qm`
command adds, lists and removes them; each tick submits one task that a real worker runs;
a kill -9 of the server between ticks and its restart fire no tick twice, and the
missed-ticks policies hold (coalesce: one task for the latest tick missed; skip: nothing
for a tick more than server.schedule_grace_s late).

Ticks are seconds apart (the 6-field cron form, seconds first, and --every), so a test
sees several fires within seconds. Which ticks fired is read from the server's store (the
oracle: each fired task's idempotency key names its tick); tasks are test.flaky "PATH:0",
which appends one mark to PATH per run, so the file counts executions.
"""
from __future__ import annotations

import datetime
import json
import math
import sqlite3
import time

import pytest

import qm
from tests.processes import run_qm, wait_until

pytestmark = pytest.mark.timeout(300)

#: Bound on the fires a test waits for, and on the fired tasks finishing.
FIRES_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 120.0


def runs(path) -> int:
    return len(path.read_text()) if path.exists() else 0


def tick_of(key: str) -> float:
    """The tick time in a fired task's idempotency key, schedule:<id>:<ISO 8601 UTC>."""
    iso = key.split(":", 2)[2].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(iso).timestamp()


def fired_in_sqlite(server, schedule_id: str) -> list[tuple[float, str]]:
    """(tick, task id) of every task the schedule fired, by tick, from the server's store."""
    path = server.data_dir / f"{server.server_id}.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT idempotency_key, task_id FROM tasks WHERE schedule_id = ?", (schedule_id,))
        return sorted((tick_of(key), task_id) for key, task_id in rows)


def schedule_named(client: qm.Client, schedule_id: str):
    return next(s for s in client.list_schedules() if s.schedule_id == schedule_id)


def wait_fires(client: qm.Client, schedule_id: str, at_least: int) -> None:
    wait_until(lambda: schedule_named(client, schedule_id).fires >= at_least, FIRES_TIMEOUT_S,
               message=f"schedule {schedule_id} fired {at_least} tasks")


def all_succeeded(client: qm.Client, task_ids: list[str]) -> None:
    finals = {status.task_id: status for status in client.results(task_ids, timeout_s=RESULT_TIMEOUT_S)}
    assert {status.state for status in finals.values()} == {"SUCCEEDED"}, finals
    assert len(finals) == len(task_ids)


def test_the_qm_command_adds_lists_and_removes_a_schedule_firing_each_second_once(stack, tmp_path):
    counter = tmp_path / "runs"
    added = run_qm("schedule", "add", "--cron", "* * * * * *", "-T", "test.flaky", "-P", f"{counter}:0",
                   "--queue", stack.queue, "--id", "each-second", server=stack.server.address)
    assert added.returncode == 0 and added.stdout.strip() == "each-second", added
    assert "first tick at" in added.stderr
    refused = run_qm("schedule", "add", "--cron", "* 25 * * *", "-T", "math", "-P", "1",
                     server=stack.server.address)
    assert refused.returncode == 2 and "field 2 (hour)" in refused.stderr, refused

    wait_fires(stack.client, "each-second", 3)
    listed = run_qm("schedule", "list", "--json", server=stack.server.address)
    [shown] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (shown["id"], shown["cron"], shown["type"], shown["missed"]) == (
        "each-second", "* * * * * *", "test.flaky", "coalesce")
    removed = run_qm("schedule", "remove", "each-second", server=stack.server.address)
    assert removed.returncode == 0 and removed.stdout.startswith("removed each-second"), removed
    removed_at = time.time()
    gone = run_qm("schedule", "remove", "each-second", server=stack.server.address)
    assert gone.returncode == 1 and "no schedule 'each-second'" in gone.stderr, gone

    fired = fired_in_sqlite(stack.server, "each-second")
    ticks = [tick for tick, _ in fired]
    assert len(fired) >= 3 and ticks == sorted(set(ticks)), fired  # one task per tick
    assert all(tick == math.floor(tick) for tick in ticks) and ticks[-1] <= removed_at
    all_succeeded(stack.client, [task_id for _, task_id in fired])
    assert runs(counter) == len(fired)  # each ran once
    status = run_qm("status", fired[0][1], "--json", server=stack.server.address)
    assert json.loads(status.stdout)["schedule_id"] == "each-second"
    assert stack.client.status(fired[-1][1]).schedule_id == "each-second" and shown["fires"] >= 3
    wait_until(lambda: time.time() > removed_at + 2, 5.0)
    assert fired_in_sqlite(stack.server, "each-second") == fired  # nothing after the remove


def test_a_kill_9_between_ticks_fires_no_tick_twice_and_keeps_the_missed_ticks_policy(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    grace = {"QM_SERVER__SCHEDULE_GRACE_S": "1"}
    server = launcher.server(rabbitmq.url, env=grace)
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    coalesced, skipped = tmp_path / "coalesce-runs", tmp_path / "skip-runs"
    with qm.Client(server.address) as client:
        client.add_schedule("test.flaky", f"{coalesced}:0", every_s=1, queue=queue, schedule_id="coalesce-1s")
        client.add_schedule("test.flaky", f"{skipped}:0", every_s=4, missed="skip", queue=queue,
                            schedule_id="skip-4s")
        wait_fires(client, "coalesce-1s", 3)
    killed_at = time.time()
    server.kill()
    skipped_tick = (math.floor((killed_at + 0.5) / 4) + 1) * 4  # skip-4s's next tick, passed while down
    # Down over several ticks: past skip-4s's next one by more than its grace of 1 s.
    wait_until(lambda: time.time() > max(skipped_tick + 2, killed_at + 3), 10.0)
    restarted_at = time.time()
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id, data_dir=server.data_dir, env=grace,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])
    with qm.Client(restarted.address) as client:
        fires_before = len([t for t, _ in fired_in_sqlite(restarted, "coalesce-1s") if t <= killed_at])
        wait_fires(client, "coalesce-1s", fires_before + 4)
        wait_until(lambda: any(t > skipped_tick for t, _ in fired_in_sqlite(restarted, "skip-4s")),
                   FIRES_TIMEOUT_S, message="skip-4s fired after the restart")
        schedules = {s.schedule_id: s for s in client.list_schedules()}
        for schedule_id in ("coalesce-1s", "skip-4s"):
            client.remove_schedule(schedule_id)
        fired = {name: fired_in_sqlite(restarted, name) for name in ("coalesce-1s", "skip-4s")}
        all_succeeded(client, [task_id for tasks in fired.values() for _, task_id in tasks])

    ticks = [tick for tick, _ in fired["coalesce-1s"]]
    assert ticks == sorted(set(ticks)), ticks  # no tick fired twice
    before = [t for t in ticks if t <= killed_at]
    after = [t for t in ticks if t > killed_at]
    # coalesce: the ticks passed while down fired once, as the latest one, when the server was back
    assert after[0] >= math.floor(restarted_at), (before, after, killed_at, restarted_at)
    missed_while_down = after[0] - before[-1] - 1
    assert missed_while_down >= 2 and schedules["coalesce-1s"].missed_ticks >= missed_while_down
    skip_ticks = [tick for tick, _ in fired["skip-4s"]]
    assert skipped_tick not in skip_ticks and skip_ticks == sorted(set(skip_ticks)), (skip_ticks, skipped_tick)
    assert schedules["skip-4s"].missed_ticks >= 1
    # At least once: a kill -9 between a tick's commit and its confirm mark publishes the
    # task again at the restart (same task id); never a second task for a tick.
    assert runs(coalesced) >= len(ticks) and runs(skipped) >= len(skip_ticks)
    print(f"\n[faults] schedules: kill -9 of the server: coalesce-1s fired {len(ticks)} tick(s) "
          f"({len(before)} before, {len(after)} after, {missed_while_down:.0f} coalesced while down, "
          f"{runs(coalesced)} run(s)); skip-4s fired {len(skip_ticks)}, tick {skipped_tick:.0f} skipped",
          flush=True)


def test_the_asyncio_client_manages_schedules_and_errors_name_the_field(stack):
    import asyncio

    import grpc

    import qm.aio
    from qm.client.client import RemoteError

    async def scenario() -> None:
        async with qm.aio.Client(stack.server.address) as client:
            added = await client.add_schedule("math", "6 * 7", cron="0 3 * * *", timezone="Europe/Paris",
                                              queue=stack.queue, schedule_id="nightly", max_retries=2)
            assert (added.cron, added.timezone, added.missed, added.fires) == ("0 3 * * *", "Europe/Paris",
                                                                               "coalesce", 0)
            # 03:00 in Paris is 01:00 or 02:00 UTC, whichever the date's offset
            assert datetime.datetime.fromtimestamp(added.next_fire_at, datetime.timezone.utc).hour in (1, 2)
            again = await client.add_schedule("math", "6 * 7", cron="0 3 * * *", timezone="Europe/Paris",
                                              queue=stack.queue, schedule_id="nightly", max_retries=2)
            assert again == added  # a retried add: one schedule
            assert [s.schedule_id for s in await client.list_schedules()] == ["nightly"]
            for options, field in (({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "timezone"),
                                   ({"every_s": 0.2}, "every_s"),
                                   ({"cron": "0 3 * * *", "schedule_id": "nightly"}, "schedule_id")):
                with pytest.raises(RemoteError) as refused:
                    await client.add_schedule("math", "6 * 7", queue=stack.queue, **options)
                assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT, refused.value
                assert refused.value.details.startswith(f"{field}:"), refused.value.details
            assert (await client.remove_schedule("nightly")).schedule_id == "nightly"
            with pytest.raises(RemoteError) as missing:
                await client.remove_schedule("nightly")
            assert (missing.value.code, missing.value.reason) == (grpc.StatusCode.NOT_FOUND, "SCHEDULE_NOT_FOUND")
            assert await client.list_schedules() == []

    asyncio.run(scenario())
