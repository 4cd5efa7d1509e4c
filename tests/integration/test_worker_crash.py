"""A worker host dies mid-task (kill -9 of qm-worker): the task is not lost, and the dead
worker leaves no task process running."""
from __future__ import annotations

import qm
from tests.processes import gone, wait_until

#: Bound on the killed worker's children ending after it.
ORPHAN_TIMEOUT_S = 20.0
RESULT_TIMEOUT_S = 60.0


def test_task_of_a_killed_worker_is_completed_by_another(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=1, queues=queue)

    with qm.Client(server.address) as client:
        task_id = client.submit("test.sleep", "3", queue=queue)
        running = None
        for status in client.watch([task_id], timeout_s=RESULT_TIMEOUT_S):
            if status.state == "RUNNING":
                running = status
                break
        assert running is not None and running.worker == doomed.worker_id, doomed.logs

        family = doomed.descendants()  # the forkserver and the child running the task
        task_children = [process for process in family if process.ppid() != doomed.pid]
        assert task_children, f"no pool child (grandchild of the worker) among {family}"
        doomed.kill()
        wait_until(lambda: all(gone(process) for process in family), ORPHAN_TIMEOUT_S,
                   message=f"children {[p.pid for p in family]} of the killed worker ending")

        rescuer = launcher.worker(rabbitmq.url, procs=1, queues=queue)
        assert client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "3", rescuer.logs
        status = client.status(task_id)
        assert status.state == "SUCCEEDED"
        assert status.worker == rescuer.worker_id
