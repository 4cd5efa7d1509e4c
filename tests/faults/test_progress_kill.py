"""kill -9 of a worker while its task reports progress: progress is advisory, the outcome
is not. The task runs again elsewhere from the start (its progress starts over, never
ahead of the new run), and reaches exactly one terminal state, SUCCEEDED.

The task reports step 1 and then waits on a gate the test opens only after the kill, so
it was certainly cut off mid-run, however slow the machine is."""
from __future__ import annotations

import pytest

import qm
from tests.faults.support import SETTLE_TIMEOUT_S, Watcher, executions, tails, wait_settled
from tests.processes import gone, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

#: Bound on the task starting and reporting on a loaded machine.
REPORT_TIMEOUT_S = 60.0
#: Bound on the killed worker's children ending after it.
ORPHAN_TIMEOUT_S = 30.0
STEPS = 5


def test_kill_9_mid_progress_reruns_the_task_to_one_terminal_state(rabbitmq, launcher, gates):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    gate = gates()

    with qm.Client(server.address) as client:
        task_id = client.submit("test.progress", f"{STEPS}:0.05:{gate.path}", queue=queue)
        watcher = Watcher(server.address, [task_id])
        reported = wait_until(lambda: [s for s in watcher.updates.get(task_id, []) if s.progress_at is not None],
                              REPORT_TIMEOUT_S, interval_s=0.05, message="the task reporting its first step")
        assert reported[0].worker == doomed.worker_id and reported[0].progress == 1 / STEPS
        family = doomed.descendants()
        doomed.kill()
        wait_until(lambda: all(gone(process) for process in family), ORPHAN_TIMEOUT_S,
                   message="the killed worker's children ending")
        gate.open()
        rescuer = launcher.worker(rabbitmq.url, procs=1, queues=queue)
        workers = [doomed, rescuer]
        wait_settled(watcher, SETTLE_TIMEOUT_S, workers + [server], stall_s=SETTLE_TIMEOUT_S)
        final = client.status(task_id)

    updates = watcher.updates[task_id]
    logs = tails(workers + [server])
    terminal = [status for status in updates if status.terminal]
    assert [status.state for status in terminal] == ["SUCCEEDED"], (updates, logs)
    assert final.state == "SUCCEEDED" and final.result == f"done {STEPS}" and final.worker == rescuer.worker_id
    # The rerun started from nothing: its RUNNING came without the dead run's progress, and
    # every report after it is the new run's, in order.
    rerun = [status for status in updates if status.worker == rescuer.worker_id and not status.terminal]
    assert rerun and rerun[0].progress_at is None, (updates, logs)
    fractions = [status.progress for status in rerun if status.progress_at is not None]
    assert fractions == sorted(fractions), (updates, logs)
    # The rescuer logs the outcome before it publishes it; the line may still be on its way
    # through the pipe to this test on a busy machine.
    rescuer.wait_for_line(rf"task {task_id} \(test\.progress\) attempt \d+: SUCCEEDED", ORPHAN_TIMEOUT_S)
    done = [run for run in executions(workers) if run.task_id == task_id]
    assert [(run.worker, run.state) for run in done] == [(rescuer.name, "SUCCEEDED")], logs
    print(f"[faults] progress kill -9: {len(updates)} statuses streamed, {len(fractions)} progress "
          f"reports of the rerun, 1 terminal state")
