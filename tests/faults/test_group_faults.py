"""Groups with a callback survive real faults between their members (issue 14, item 4):
kill -9 of the worker running some members, and kill -9 of qm-server (restarted with its
id, data dir and port) while members finish without it. Either way the callback runs
exactly once, with every member's result in order.

Members are held running with gates (test.wait_for) until the fault has happened, so the
fault falls between members however fast or slow the machine is. The callback
(test.group_record) appends one line per run to a log file: the count of runs."""
from __future__ import annotations

import json
import re

import pytest

import qm
from tests.faults.support import StatusProbe, tails
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

#: Bound on members reaching the states a test waits for, and on the callback finishing.
SETTLE_TIMEOUT_S = 120.0


def callback_runs(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def counts(client, group_id: str) -> dict[str, int]:
    return {str(state): count for state, count in client.group_status(group_id).counts.items()}


def finish_group(client, group_id: str) -> qm.client.client.TaskStatus:
    """Wait for every member, then for the callback (it exists once the last one finished)."""
    group = client.group_status(group_id)
    list(client.results(group.task_ids, timeout_s=SETTLE_TIMEOUT_S))
    callback_id = client.group_status(group_id).callback_task_id
    return list(client.results([callback_id], timeout_s=SETTLE_TIMEOUT_S))[-1]


def test_kill_9_of_the_worker_between_members(rabbitmq, launcher, gates, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    probe = StatusProbe(doomed)
    held = [gates() for _ in range(2)]
    log = tmp_path / "callback.log"
    items = [("math", "1 + 1"), ("math", "2 + 2")] + [("test.wait_for", gate.payload) for gate in held]

    with qm.Client(server.address) as client:
        group_id = client.submit_group(items, then=("test.group_record", {"log": str(log)}), queue=queue)
        gated_ids = set(client.group_status(group_id).task_ids[2:])
        # Two members done, the other two running on the doomed worker: kill it there.
        wait_until(lambda: counts(client, group_id).get("SUCCEEDED") == 2
                   and {busy[1] for busy in probe.busy()} == gated_ids, SETTLE_TIMEOUT_S, interval_s=0.05,
                   message="two members finished and the gated two running on the doomed worker")
        doomed.kill()
        probe.close()
        launcher.worker(rabbitmq.url, procs=2, queues=queue)
        for gate in held:
            gate.open()
        callback = finish_group(client, group_id)

        processes = [server, doomed] + launcher.started[-1:]
        assert callback.state == "SUCCEEDED", f"{callback.error}\n{tails(processes)}"
        assert callback.result["results"] == ["2", "4"] + [gate.payload for gate in held]
        assert callback.result["sum"] == 6 and callback.result["failed"] == []
        assert [run["group_id"] for run in callback_runs(log)] == [group_id], tails(processes)
        assert counts(client, group_id) == {"SUCCEEDED": 4}


def test_kill_9_of_the_server_while_members_finish(rabbitmq, launcher, gates, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    held = [gates() for _ in range(2)]
    log = tmp_path / "callback.log"
    items = [("math", "3 * 3"), ("math", "4 * 4")] + [("test.wait_for", gate.payload) for gate in held]

    with qm.Client(server.address) as client:
        group_id = client.submit_group(items, then=("test.group_record", {"log": str(log)}), queue=queue)
        gated_ids = client.group_status(group_id).task_ids[2:]
        wait_until(lambda: counts(client, group_id) == {"SUCCEEDED": 2, "RUNNING": 2}, SETTLE_TIMEOUT_S,
                   interval_s=0.05, message="two members finished and two running")
    # The last members finish while the server is down: their events wait in its queue.
    server.kill()
    for gate in held:
        gate.open()
    for task_id in gated_ids:
        worker.wait_for_line(re.compile(rf"task {task_id} \(test.wait_for\) attempt \d+: SUCCEEDED"),
                             SETTLE_TIMEOUT_S)
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])

    with qm.Client(restarted.address) as client:
        callback = finish_group(client, group_id)
        processes = [server, restarted, worker]
        assert callback.state == "SUCCEEDED", f"{callback.error}\n{tails(processes)}"
        assert callback.result["results"] == ["9", "16"] + [gate.payload for gate in held]
        assert [run["group_id"] for run in callback_runs(log)] == [group_id], tails(processes)
        group = client.group_status(group_id)
        assert group.counts == {"SUCCEEDED": 4} and group.callback_state == "SUCCEEDED"
