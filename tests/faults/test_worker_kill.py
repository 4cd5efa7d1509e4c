"""Scenario 1: kill -9 of a worker supervisor mid-run. Two workers share a queue; one is
killed while it runs tasks; the other finishes everything, nothing is lost, and the killed
worker leaves no child behind."""
from __future__ import annotations

import pytest

import qm
from tests.faults.support import (SETTLE_TIMEOUT_S, StatusProbe, Watcher, check_and_report, mixed_workload,
                                  statuses, submit_all, tails, wait_settled)
from tests.processes import gone, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

TASKS = 240
#: Bound on the doomed worker getting busy with the workload.
BUSY_TIMEOUT_S = 60.0
#: Bound on the killed worker's children ending after it.
ORPHAN_TIMEOUT_S = 30.0


def test_kill_9_of_a_worker_supervisor_mid_run(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    survivor = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    workers = [doomed, survivor]
    probe = StatusProbe(doomed)

    with qm.Client(server.address) as client:
        accepted = submit_all(client, mixed_workload(TASKS), queue)
        watcher = Watcher(server.address, accepted)

        # Kill it while it runs a one-second task with some way to go, after it has done some work.
        def busy_with_a_sleep():
            if sum(1 for line in doomed.stderr.splitlines() if ": SUCCEEDED" in line) < 10:
                return None
            running = probe.busy()
            return running if any(kind == "test.sleep" and 0.0 <= age < 0.6 for _, _, kind, age in running) \
                else None

        running = wait_until(busy_with_a_sleep, BUSY_TIMEOUT_S, interval_s=0.05,
                             message="the doomed worker running a test.sleep")
        family = doomed.descendants()
        doomed.kill()
        probe.close()
        # One-second tasks with over 0.4 s to go: certainly cut off by the kill.
        in_flight = {task_id for _, task_id, kind, age in running if kind == "test.sleep" and age < 0.6}
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
