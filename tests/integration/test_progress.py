"""Progress from inside a task, end to end (issue 14, item 1): real RabbitMQ, qm-server
and qm-worker processes. A task reporting steps is seen advancing by a watcher and by
`qm status --json`; a task calling qm.progress thousands of times still finishes, and the
server receives at most about 10 reports a second of it."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request

import pytest

import qm
import qm.aio
from qm.testing.rabbitmq import free_port
from tests.processes import command, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(240)]

#: Bound on a task's states showing up on a loaded machine.
STATE_TIMEOUT_S = 120.0
#: What the supervisor lets through per task and second (qm/worker/progress.py).
EVENTS_PER_S = 10


def counter(url: str, name: str, labels: str = "") -> float:
    """The value of one counter sample (0 if absent) from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0


def test_a_watcher_sees_the_steps_advance_then_success_and_status_shows_the_last(rabbitmq, launcher, gates):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    launcher.worker(rabbitmq.url, procs=1, queues=queue)
    gate = gates()  # the task waits after step 1 until the watcher has seen it

    with qm.Client(server.address) as client:
        task_id = client.submit("test.progress", f"5:0.3:{gate.path}", queue=queue)
        seen = []
        for status in client.watch([task_id], timeout_s=STATE_TIMEOUT_S):
            seen.append(status)
            if status.progress_at is not None:
                gate.open()

    reports = [status for status in seen if status.progress_at is not None and not status.terminal]
    fractions = [status.progress for status in reports]
    logs = f"{seen}\n{server.logs}"
    assert seen[-1].state == "SUCCEEDED" and seen[-1].result == "done 5", logs
    assert len(fractions) >= 2 and fractions == sorted(set(fractions)), logs  # strictly increasing
    for status in reports:  # each report arrives whole: fraction, message and detail together
        step = round(status.progress * 5)
        assert status.state == "RUNNING", logs
        assert (status.progress_message, status.progress_detail) == (f"step {step}", {"step": step}), logs
    # The outcome keeps the last report that arrived, never one from after it.
    assert (seen[-1].progress, seen[-1].progress_message) == (fractions[-1], reports[-1].progress_message), logs

    async def aio_watch():  # the task is over: its one status, with the progress it ended with
        async with qm.aio.Client(server.address) as aio_client:
            return [status async for status in aio_client.watch([task_id], timeout_s=STATE_TIMEOUT_S)]

    [aio_final] = asyncio.run(aio_watch())
    assert (aio_final.state, aio_final.progress, aio_final.progress_detail) == (
        "SUCCEEDED", seen[-1].progress, seen[-1].progress_detail)

    shown = subprocess.run([command("qm"), "--server", server.address, "status", task_id, "--json"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "SUCCEEDED" and data["progress"] == seen[-1].progress
    assert data["progress_message"] == seen[-1].progress_message


def test_ten_thousand_calls_finish_and_reach_the_server_at_most_ten_a_second(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server_metrics, worker_metrics = free_port(), free_port()
    server = launcher.server(rabbitmq.url, extra_args=["--metrics-port", str(server_metrics)])
    launcher.worker(rabbitmq.url, procs=1, queues=queue, extra_args=["--metrics-port", str(worker_metrics)])
    server_url = f"http://127.0.0.1:{server_metrics}/metrics"
    worker_url = f"http://127.0.0.1:{worker_metrics}/metrics"

    with qm.Client(server.address) as client:
        task_id = client.submit("test.progress_spam", "10000:2", queue=queue)
        seen = list(client.watch([task_id], timeout_s=STATE_TIMEOUT_S))
    final = seen[-1]
    assert final.state == "SUCCEEDED" and final.result == "spammed 10000", server.logs

    published = wait_until(lambda: counter(worker_url, "qm_worker_progress_events_total"), STATE_TIMEOUT_S,
                           message="the worker counting its progress events")
    # Everything the worker published is applied before the outcome that followed it.
    received = wait_until(lambda: counter(server_url, "qm_server_events_total", '{state="PROGRESS"}') >= published
                          and counter(server_url, "qm_server_events_total", '{state="PROGRESS"}'),
                          STATE_TIMEOUT_S, message="the server applying the progress events")
    coalesced = counter(worker_url, "qm_worker_progress_dropped_total", '{reason="rate_limit"}')
    assert final.started_at is not None and final.finished_at is not None
    run_s = final.finished_at - final.started_at
    print(f"[progress] 10,000 calls over {run_s:.2f} s: {received:.0f} events reached the server "
          f"({received / run_s:.1f}/s), {coalesced:.0f} coalesced by the rate limit, "
          f"{len(seen)} statuses on the watch stream")
    # The window of each event opens when it is sent: at most one per 0.1 s, plus the first.
    assert 2 <= received <= EVENTS_PER_S * run_s + 1, (received, run_s)
    assert coalesced > 0
    assert len(seen) <= received + 3  # QUEUED/RUNNING/SUCCEEDED + one status per report at most
