"""Scenario 1: kill -9 of a worker supervisor mid-run. Two workers share a queue; one is
killed while it runs tasks; the other finishes everything, nothing is lost, and the killed
worker leaves no child behind.

The doomed worker is killed while it runs a gated task (test.wait_for), whose gate opens
only after the kill: that task was certainly cut off, however slow the machine is."""
from __future__ import annotations

import time

import pytest

import qm
from qm.worker.prefetch import LEVELS
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
    Spec,
    StatusProbe,
    Watcher,
    check_and_report,
    mixed_workload,
    statuses,
    submit_all,
    tails,
    wait_settled,
)
from tests.processes import gone, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

TASKS = 240
#: Gated tasks submitted once the doomed worker has done some work: more than the
#: survivor can hold at once (2 children, at most LEVELS[-1][0] deliveries each, after
#: tiny tasks), so the doomed worker gets some of them.
GATED = 2 * LEVELS[-1][0] + 8
#: Tasks the doomed worker completes before the gated ones are submitted.
WORK_BEFORE_KILL = 10
#: Bound on the doomed worker getting busy with the workload.
BUSY_TIMEOUT_S = 60.0
#: Bound on the killed worker's children ending after it.
ORPHAN_TIMEOUT_S = 30.0


def test_kill_9_of_a_worker_supervisor_mid_run(rabbitmq, launcher, gates):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    survivor = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    workers = [doomed, survivor]
    probe = StatusProbe(doomed)
    specs = mixed_workload(TASKS)
    gated = [gates() for _ in range(GATED)]
    gated_specs = [Spec("test.wait_for", gate.payload, gate.payload, f"gated-{n}-{time.time_ns()}")
                   for n, gate in enumerate(gated)]

    with qm.Client(server.address) as client:
        # Kill it after it has done some work, while it runs a gated task.
        accepted = submit_all(client, specs[:TASKS // 2], queue)
        wait_until(lambda: doomed.stderr.count(": SUCCEEDED") >= WORK_BEFORE_KILL, BUSY_TIMEOUT_S,
                   message=f"the doomed worker finishing {WORK_BEFORE_KILL} tasks")
        accepted.update(submit_all(client, gated_specs + specs[TASKS // 2:], queue))
        watcher = Watcher(server.address, accepted)
        gated_ids = {task_id for task_id, spec in accepted.items() if spec in gated_specs}

        running = wait_until(lambda: [busy for busy in probe.busy() if busy[1] in gated_ids], BUSY_TIMEOUT_S,
                             interval_s=0.05, message="the doomed worker running a gated task")
        family = doomed.descendants()
        doomed.kill()
        probe.close()
        for gate in gated:
            gate.open()
        # Gated tasks it was running: they could not have ended before the kill.
        in_flight = {task_id for _, task_id, _, _ in running}
        wait_until(lambda: all(gone(process) for process in family), ORPHAN_TIMEOUT_S,
                   message=f"children {[p.pid for p in family]} of the killed worker ending")

        wait_settled(watcher, SETTLE_TIMEOUT_S, workers + [server])
        final = statuses(client, accepted)

    counts = check_and_report("worker kill -9", accepted, watcher, final, workers, logs_of=[server], extra={
        "in_flight_on_killed_worker": len(in_flight),
        "finished_by_killed": sum(1 for s in final.values() if s.worker == doomed.worker_id),
        "finished_by_survivor": sum(1 for s in final.values() if s.worker == survivor.worker_id)})
    # The tasks the killed worker was running were finished by the survivor.
    for task_id in in_flight:
        assert final[task_id].worker == survivor.worker_id, (task_id, final[task_id], tails(workers))
    assert survivor.alive(), tails(workers)
    assert counts["finished_by_survivor"] >= len(in_flight)
