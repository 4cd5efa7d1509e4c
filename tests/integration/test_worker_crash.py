"""A worker host dies mid-task (kill -9 of qm-worker): the task is not lost, and the dead
worker leaves nothing running: not its children, not what the task started, not the
forkserver. The task spins for a minute, so a test that passed only because an orphan
finished its task by itself cannot pass here."""
from __future__ import annotations

import uuid

import psutil
import pytest

import qm
from tests.processes import gone, wait_until

#: The task (and the subprocess it starts) would spin this long if nothing killed them.
TASK_S = 60
#: Bound on the killed worker's whole family ending after it (the promise is 2 s).
ORPHAN_TIMEOUT_S = 5.0
#: Bound on a state showing up on the stream (loaded machine: generous).
STATE_TIMEOUT_S = 60.0


def tagged(tag: str) -> list[psutil.Process]:
    """Every process on the host whose command line carries `tag` (the task's subprocess)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if tag in (process.info["cmdline"] or []):
            found.append(process)
    return found


def wait_running_on(client: qm.Client, task_id: str, worker_id: str) -> None:
    for status in client.watch([task_id], timeout_s=STATE_TIMEOUT_S):
        if status.state == "RUNNING" and status.worker == worker_id:
            return
    raise AssertionError(f"task {task_id} never ran on {worker_id}")


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_killed_worker_leaves_nothing_running_and_its_task_runs_once_elsewhere(rabbitmq, launcher, start_method):
    env = {"QM_WORKER__START_METHOD": start_method}
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=2, queues=queue, env=env)
    tag = f"qm-orphan-{uuid.uuid4().hex}"

    with qm.Client(server.address) as client:
        task_id = client.submit("test.spawn_spin", f"{TASK_S} {tag}", queue=queue)
        wait_running_on(client, task_id, doomed.worker_id)
        wait_until(lambda: tagged(tag), STATE_TIMEOUT_S, message="the task's subprocess starting")
        family = doomed.descendants()  # children, the task's subprocess, the forkserver
        assert {p.pid for p in tagged(tag)} <= {p.pid for p in family}, doomed.logs
        if start_method == "forkserver":
            assert any(p.ppid() == doomed.pid and p not in tagged(tag) for p in family)

        doomed.kill()
        wait_until(lambda: all(gone(process) for process in family), ORPHAN_TIMEOUT_S,
                   message=f"the family {[(p.pid, p.name()) for p in family if not gone(p)]} "
                           "of the killed worker ending")

        rescuer = launcher.worker(rabbitmq.url, procs=2, queues=queue, env=env)
        wait_running_on(client, task_id, rescuer.worker_id)
        wait_until(lambda: tagged(tag), STATE_TIMEOUT_S, message="the redelivered task's subprocess starting")
        copies = tagged(tag)
        assert len(copies) == 1, f"{len(copies)} executions of the task are running: {copies}"
        assert copies[0].pid in {p.pid for p in rescuer.descendants()}

        client.cancel(task_id)
        assert client.status(task_id).state == "CANCELLED"
        wait_until(lambda: not tagged(tag), STATE_TIMEOUT_S, message="the cancelled task's subprocess ending")


def test_child_stuck_in_native_code_dies_with_its_killed_worker(rabbitmq, launcher):
    """A task holding the GIL cannot run its child's lifeline thread: the forkserver's
    reaper kills its process group instead."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    with qm.Client(server.address) as client:
        task_id = client.submit("test.hold_gil", "64", queue=queue)
        wait_running_on(client, task_id, doomed.worker_id)
        family = doomed.descendants()
        doomed.kill()
        wait_until(lambda: all(gone(process) for process in family), ORPHAN_TIMEOUT_S,
                   message=f"the family {[(p.pid, p.name()) for p in family if not gone(p)]} "
                           "of the killed worker ending")
        client.cancel(task_id)
