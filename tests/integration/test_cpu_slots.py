"""Resource-aware slots with real RabbitMQ, qm-server and qm-worker processes: a 2-CPU task
on a 2-slot worker runs alone and sees its allowance, the busy CPUs show in `qm workers`, a
task bigger than every worker is refused with the way out, and a 2-CPU task whose worker
is killed -9 mid-run runs again on the next worker."""
from __future__ import annotations

import json
import os

import grpc
import pytest

import qm
from qm.client.common import RemoteError
from qm.reasons import Reason
from tests.processes import Gate, run_qm, unique, wait_until

#: Bound on a task (or a worker's heartbeat) showing up; a loaded machine is slow.
STATE_TIMEOUT_S = 90.0
#: Workers heartbeat this often here, so `qm workers` follows a task's start.
FAST_BEAT = {"QM_WORKER__HEARTBEAT_INTERVAL_S": "0.5"}
ALLOWED = sorted(os.sched_getaffinity(0))
#: The worker pins its tasks when its --procs (2 here) fits the CPUs it may use.
PINNED = len(ALLOWED) >= 2


def probe(**payload) -> str:
    return json.dumps(payload)


def seen_with(client: qm.Client, worker_id: str, **fields) -> bool:
    found = {w.worker_id: w for w in client.workers()}.get(worker_id)
    return found is not None and all(getattr(found, name) == value for name, value in fields.items())


def test_a_two_cpu_task_runs_alone_on_a_two_slot_worker_and_sees_its_two_cpus(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    launcher.track_queue(rabbitmq.url, f"qm.tasks.{queue}.cpus2")
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue, env=FAST_BEAT)
    gate = Gate(tmp_path)
    started = tmp_path / unique("started")

    with qm.Client(server.address) as client:
        # The 2-CPU task (cpus from its type) is held at a gate until `qm workers` shows it.
        big = client.submit("test.slot_probe2", probe(started_file=str(started), gate=str(gate.path)), queue=queue)
        small = client.submit_many([("test.slot_probe", probe(hold_s=0.5))] * 4, queue=queue)
        wait_until(started.exists, STATE_TIMEOUT_S, message="the 2-CPU task starting")
        wait_until(lambda: seen_with(client, worker.worker_id, busy_cpus=2, busy=1), STATE_TIMEOUT_S,
                   message="qm workers showing the 2-CPU task's two busy CPUs")
        listed = run_qm("workers", server=server.address).stdout
        assert f"busy 1/2 cpus 2/2 queues {queue}" in listed, listed
        gate.open()
        finals = {status.task_id: status for status in client.results([big, *small], STATE_TIMEOUT_S)}

    assert {status.state for status in finals.values()} == {"SUCCEEDED"}, finals
    assert finals[big].cpus == 2 and {finals[task_id].cpus for task_id in small} == {1}
    big_run = finals[big].result
    assert (big_run["task_cpus"], big_run["subprocess_env"]) == (2, "2")
    assert big_run["affinity"] == (ALLOWED[:2] if PINNED else ALLOWED)
    for task_id in small:
        run = finals[task_id].result
        assert (run["task_cpus"], run["subprocess_env"]) == (1, "1")
        assert len(run["affinity"]) == 1 if PINNED else run["affinity"] == ALLOWED
        overlap = run["started_at"] < big_run["ended_at"] and run["ended_at"] > big_run["started_at"]
        assert not overlap, f"a 1-CPU task ran {run} while the 2-CPU task ran {big_run}"
    shown = json.loads(run_qm("status", big, "--json", server=server.address).stdout)
    assert shown["cpus"] == 2


def test_a_task_bigger_than_every_worker_is_refused_naming_cpus_and_the_fix(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env={"QM_SERVER__MAX_TASK_CPUS": "8"})
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue, env=FAST_BEAT)

    with qm.Client(server.address) as client:
        wait_until(lambda: seen_with(client, worker.worker_id, procs=2), STATE_TIMEOUT_S,
                   message="the server hearing of the --procs 2 worker")
        with pytest.raises(RemoteError) as refused:
            client.submit("test.slot_probe", probe(), queue=queue, cpus=3)
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                              Reason.NO_WORKER_FITS)
        assert "cpus: the task asks for 3 CPUs" in refused.value.details
        assert "--procs 2" in refused.value.details and "--procs 3 or more" in refused.value.details
        with pytest.raises(RemoteError) as capped:
            client.submit("test.slot_probe", probe(), queue=queue, cpus=9)
        assert capped.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "cpus: 9 exceeds the server's maximum of 8 (server.max_task_cpus)" in capped.value.details

    result = run_qm("submit", "-T", "test.slot_probe", "-P", "{}", "--queue", queue, "--cpus", "3",
                    server=server.address)
    assert result.returncode != 0 and "asks for 3 CPUs" in result.stderr and "--procs 2" in result.stderr


def test_a_two_cpu_task_whose_worker_is_killed_runs_again_on_the_next_worker(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    launcher.track_queue(rabbitmq.url, f"qm.tasks.{queue}.cpus2")
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    started = tmp_path / unique("started")
    gate = Gate(tmp_path)  # never opened: the first run holds until its worker dies

    with qm.Client(server.address) as client:
        task_id = client.submit("test.slot_probe", probe(started_file=str(started), gate=str(gate.path)),
                                queue=queue, cpus=2)
        wait_until(started.exists, STATE_TIMEOUT_S, message="the 2-CPU task starting")
        doomed.kill()
        rescuer = launcher.worker(rabbitmq.url, procs=2, queues=queue)
        [final] = client.results([task_id], STATE_TIMEOUT_S)

    assert final.state == "SUCCEEDED", final
    assert (final.worker, final.cpus) == (rescuer.worker_id, 2)
    assert final.result["rerun"] is True and final.result["task_cpus"] == 2
    assert final.result["affinity"] == (ALLOWED[:2] if PINNED else ALLOWED)
