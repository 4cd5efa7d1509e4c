"""Scenario 2: kill -9 of pool children, repeatedly, while tasks run. A task whose child is
killed ends CRASHED when it has no retries left; with max_retries=3 every task succeeds in
the end (each task is killed at most once here), none is lost, and the worker keeps its
pool full.

The tasks whose children are killed are gated (test.wait_for): a gated task cannot end
before the test opens its gate, which it does only after the kill, so every kill certainly
cuts its task off, however slow the machine is; the next attempt then finishes."""
from __future__ import annotations

import os
import signal
import time

import pytest

import qm
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
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

TASKS = 200
#: Children killed while they run a (gated) task of the retried workload.
KILLS = 5
#: Pause between two kills.
KILL_INTERVAL_S = 1.0
#: Bound on the kill loop finding its targets.
KILL_LOOP_TIMEOUT_S = 90.0


def gated_spec(gate, name: str) -> Spec:
    return Spec("test.wait_for", gate.payload, gate.payload, f"{name}-{time.time_ns()}")


def test_kill_9_of_children_repeatedly(rabbitmq, launcher, gates):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    probe = StatusProbe(worker)
    killed: dict[str, int] = {}  # task id → pid of the child killed under it

    with qm.Client(server.address) as client:
        # One task without retries: killing its child ends it CRASHED, for good.
        doomed_spec = gated_spec(gates(), "no-retry")
        doomed = client.submit(doomed_spec.type, doomed_spec.payload, queue=queue, max_retries=0,
                               idempotency_key=doomed_spec.key)
        accepted = {doomed: doomed_spec}
        # The retried workload, with KILLS gated tasks spread through it.
        gate_by_key = {}
        specs = mixed_workload(TASKS)
        for n in range(KILLS):
            gate = gates()
            spec = gated_spec(gate, f"killed-{n}")
            gate_by_key[spec.key] = gate
            specs.insert((n + 1) * TASKS // (KILLS + 1) + n, spec)
        accepted.update(submit_all(client, specs, queue, max_retries=3, retry_backoff_s=0.0))
        gate_of = {task_id: gate_by_key[spec.key] for task_id, spec in accepted.items()
                   if spec.key in gate_by_key}
        watcher = Watcher(server.address, accepted)

        pid = wait_until(lambda: next((p for p, task_id, _, _ in probe.busy() if task_id == doomed), None),
                         KILL_LOOP_TIMEOUT_S, interval_s=0.05, message=f"task {doomed} running")
        os.kill(pid, signal.SIGKILL)
        killed[doomed] = pid

        deadline = time.monotonic() + KILL_LOOP_TIMEOUT_S
        while len(killed) < KILLS + 1:
            assert time.monotonic() < deadline, f"killed only {len(killed)} children\n{tails([worker])}"
            target = next(((p, task_id) for p, task_id, _kind, _age in probe.busy()
                           if task_id in gate_of and task_id not in killed), None)
            if target is None:
                time.sleep(0.05)
                continue
            os.kill(target[0], signal.SIGKILL)
            killed[target[1]] = target[0]
            gate_of[target[1]].open()  # its next attempt may finish
            time.sleep(KILL_INTERVAL_S)

        wait_settled(watcher, SETTLE_TIMEOUT_S, [worker, server])
        final = statuses(client, accepted)
        dead, _total = client.dead_letters()
        status_after = probe.get()
    probe.close()

    counts = check_and_report("children kill -9", accepted, watcher, final, [worker], logs_of=[server],
                              expected_state={doomed: "CRASHED"},
                              extra={"children_killed": len(killed), "child_restarts": status_after.child_restarts})
    # The task without retries: CRASHED after its one attempt, naming the signal, and dead-lettered.
    assert final[doomed].attempts == 1 and "SIGKILL" in final[doomed].error, final[doomed]
    assert doomed in {letter.task_id for letter in dead}, dead
    # Every other killed task was cut off and ran again: SUCCEEDED on a later attempt.
    for task_id in killed:
        if task_id != doomed:
            assert final[task_id].attempts >= 2, (task_id, final[task_id], tails([worker]))
    assert counts["retried(attempts>1)"] >= KILLS
    # The pool replaced every killed child and is full again.
    assert worker.alive(), tails([worker])
    assert status_after.child_restarts >= len(killed), status_after
    assert len(status_after.children) == 2 and all(child.pid for child in status_after.children), status_after
