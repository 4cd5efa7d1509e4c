"""Periodic schedules on two qm-servers sharing one PostgreSQL store (issue 14, item 2):
each tick fires exactly once whichever server gets to it, also across a kill -9 of one
server and its restart.

Two real `qm-server --store-url postgresql://...` processes race for every tick of two
schedules (one every second, one a 6-field cron every 2 seconds), a real `qm-worker` runs
the tasks (test.flaky "PATH:0": one mark in PATH per run). The store is the oracle: every
fired task's idempotency key names its tick. What must hold: no tick has two tasks; every
tick from the first fire to the last either fired once or is counted missed (a loaded
machine's late loop coalesces), never both; the servers' logs never claim one tick twice;
every fired task succeeds; each ran once unless a kill -9 caught its publish (then it
may run again, under the same task id).
"""
from __future__ import annotations

import asyncio
import math
import re

import asyncpg
import pytest

import qm
from tests.cluster.test_shared_store import client_of, start_pair
from tests.integration.test_schedules import RESULT_TIMEOUT_S, runs, tick_of, wait_fires
from tests.postgres_fixtures import fresh_database, postgres  # noqa: F401  (fixture)
from tests.processes import Launcher

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.processes, pytest.mark.faults,
              pytest.mark.slow, pytest.mark.timeout(300)]

FIRED_LINE = re.compile(r"schedule (?P<id>\S+): tick (?P<tick>\S+) fired task (?P<task>\S+)")


def fired_in_postgres(url: str, schedule_id: str) -> list[tuple[float, str]]:
    async def read() -> list[tuple[float, str]]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(
                "SELECT idempotency_key, task_id FROM tasks WHERE schedule_id = $1", schedule_id)
        finally:
            await connection.close()
        return sorted((tick_of(row[0]), row[1]) for row in rows)

    return asyncio.run(read())


def ticks_claimed_in_log(stderr: str, schedule_id: str) -> list[str]:
    return [m["tick"] for m in FIRED_LINE.finditer(stderr) if m["id"] == schedule_id]


def test_two_servers_on_one_store_fire_each_tick_once_across_a_kill_9_and_restart(rabbitmq, postgres, tmp_path):  # noqa: F811
    url = fresh_database(postgres)
    launcher = Launcher(tmp_path)
    try:
        pair = start_pair(launcher, rabbitmq.url, url, launcher.queue(rabbitmq.url))
        counters = {"each-1s": tmp_path / "runs-1s", "cron-2s": tmp_path / "runs-2s"}
        with client_of(pair.a) as via_a, client_of(pair.b) as via_b:
            via_a.add_schedule("test.flaky", f"{counters['each-1s']}:0", every_s=1, queue=pair.queue,
                               schedule_id="each-1s")
            via_b.add_schedule("test.flaky", f"{counters['cron-2s']}:0", cron="*/2 * * * * *", queue=pair.queue,
                               schedule_id="cron-2s")
            wait_fires(via_b, "each-1s", 4)
            assert pair.a.kill() == -9  # mid-run: B carries on alone
            fires_at_kill = next(s for s in via_b.list_schedules() if s.schedule_id == "each-1s").fires
            wait_fires(via_b, "each-1s", fires_at_kill + 3)
            restarted = launcher.server(rabbitmq.url, server_id=pair.a.server_id, data_dir=pair.a.data_dir,
                                        extra_args=["--store-url", url])
            with qm.Client(f"{restarted.address},{pair.b.address}") as both:
                wait_fires(both, "each-1s", fires_at_kill + 6)
                wait_fires(both, "cron-2s", 3)
                final = {s.schedule_id: both.remove_schedule(s.schedule_id) for s in both.list_schedules()}
                fired = {name: fired_in_postgres(url, name) for name in counters}
                task_ids = [task_id for tasks in fired.values() for _, task_id in tasks]
                finals = list(both.results(task_ids, timeout_s=RESULT_TIMEOUT_S))
        logs = {"a": pair.a.stderr, "a-restarted": restarted.stderr, "b": pair.b.stderr}
    finally:
        launcher.cleanup()

    assert {status.state for status in finals} == {"SUCCEEDED"} and len(finals) == len(task_ids)
    report = []
    for name, period in (("each-1s", 1), ("cron-2s", 2)):
        ticks = [tick for tick, _ in fired[name]]
        assert ticks == sorted(set(ticks)) and all(t % period == 0 for t in ticks), ticks  # one task per tick
        first_tick = (math.floor(final[name].created_at / period) + 1) * period
        span = round((ticks[-1] - first_tick) / period) + 1
        assert final[name].fires == len(ticks) and final[name].last_fired_at == ticks[-1]
        # every tick from the first to the last fired once or was counted missed (coalesced), never both
        assert len(ticks) + final[name].missed_ticks == span, (ticks, final[name])
        claimed = {server: ticks_claimed_in_log(text, name) for server, text in logs.items()}
        every_claim = [tick for ticks_of_server in claimed.values() for tick in ticks_of_server]
        assert len(every_claim) == len(set(every_claim)), claimed  # no server claimed a tick another did
        assert runs(counters[name]) >= len(ticks)
        report.append(f"{name}: {len(ticks)} ticks fired ({', '.join(f'{s} {len(c)}' for s, c in claimed.items())}), "
                      f"{final[name].missed_ticks} missed, {runs(counters[name])} run(s)")
    print(f"\n[faults] shared store schedules, kill -9 of server A and its restart: {'; '.join(report)}", flush=True)

