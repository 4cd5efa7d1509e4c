"""Stopping a worker the way service managers do: a stop signal to its whole process group
(systemd's default KillMode=control-group, supervisord's stopasgroup, Ctrl-C in a
terminal) drains exactly like a signal to the supervisor alone: the running task
finishes and SUCCEEDS, nothing is CRASHED, the worker exits 0."""
from __future__ import annotations

import signal

import pytest

import qm
from tests.processes import STOP_TIMEOUT_S, gone, wait_until

#: The running task: long enough to be mid-run when the signal comes.
TASK_S = "3"
STATE_TIMEOUT_S = 60.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("group", [True, False], ids=["to-the-group", "to-the-supervisor"])
def test_a_stop_signal_drains_the_running_task(rabbitmq, launcher, signum, group):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue, extra_args=["--drain-timeout", "60"])
    with qm.Client(server.address) as client:
        task_id = client.submit("test.sleep", TASK_S, queue=queue)
        for status in client.watch([task_id], timeout_s=STATE_TIMEOUT_S):
            if status.state == "RUNNING":
                break
        family = worker.descendants()
        worker.signal(signum, group=group)
        worker.wait_for_line(r"draining for up to", STATE_TIMEOUT_S)

        *_, status = client.watch([task_id], timeout_s=STATE_TIMEOUT_S)
        assert (status.state, status.result) == ("SUCCEEDED", TASK_S), worker.logs
        assert worker.wait(STOP_TIMEOUT_S) == 0, worker.logs
        assert "CRASHED" not in worker.stderr
    wait_until(lambda: all(gone(process) for process in family), STOP_TIMEOUT_S,
               message="the stopped worker's children ending")
