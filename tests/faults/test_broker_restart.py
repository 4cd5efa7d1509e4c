"""Scenario 4: RabbitMQ stopped (gracefully, or SIGKILLed) and started again mid-run, on
a private node with the same data directory and port. qm-server and qm-worker reconnect by
themselves (nothing is restarted) and every task accepted before the outage SUCCEEDS;
tasks submitted after it too."""
from __future__ import annotations

import time

import pytest

import qm
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
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
AFTER = 40
#: Succeeded tasks before the broker goes away.
OUTAGE_AFTER = 40
#: How long the broker stays down.
DOWN_S = 3.0
#: Reconnect backoff cap for this test's processes (a real setting).
FAST_RECONNECT = {"QM_BROKER__RECONNECT_MAX_DELAY_S": "1"}
#: Bound on the processes reconnecting once the node is back.
RECONNECT_TIMEOUT_S = 60.0


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_rabbitmq_restart_mid_run(own_rabbitmq, launcher, how):
    queue = launcher.queue(own_rabbitmq.url)
    launcher.forget_queues(own_rabbitmq.url)  # the private node is gone before teardown
    server = launcher.server(own_rabbitmq.url, env=FAST_RECONNECT)
    worker = launcher.worker(own_rabbitmq.url, procs=2, queues=queue, env=FAST_RECONNECT)
    processes = [worker, server]

    with qm.Client(server.address) as client:
        accepted = submit_all(client, mixed_workload(TASKS), queue)
        watcher = Watcher(server.address, accepted)
        wait_until(lambda: watcher.terminal_count() >= OUTAGE_AFTER, 60.0, interval_s=0.02,
                   message=f"{OUTAGE_AFTER} tasks finished before the outage")

        marks = {process: process.line_count() for process in processes}
        getattr(own_rabbitmq, how)()  # stop(): graceful; kill(): SIGKILL of the node
        finished_before_outage = watcher.terminal_count()
        time.sleep(DOWN_S)
        own_rabbitmq.start()
        for process in processes:
            process.wait_for_line(r"connected to RabbitMQ", RECONNECT_TIMEOUT_S, start=marks[process])
        # Submissions work again without restarting anything (retrying while the server
        # has not yet noticed the node is back).
        with qm.Client(server.address, submit_retry_s=RECONNECT_TIMEOUT_S) as retrying:
            accepted_after = submit_all(retrying, mixed_workload(AFTER), queue)
        later = Watcher(server.address, accepted_after)

        wait_settled(watcher, SETTLE_TIMEOUT_S, processes)
        wait_settled(later, SETTLE_TIMEOUT_S, processes)
        everything = {**accepted, **accepted_after}
        final = statuses(client, everything)

    check_and_report(f"rabbitmq {how} + start", everything, [watcher, later], final, [worker], logs_of=[server], extra={
        "finished_before_outage": finished_before_outage, "accepted_after_restart": len(accepted_after),
        "server_reconnects": server.stderr.count("lost connection to RabbitMQ"),
        "worker_reconnects": worker.stderr.count("lost connection to RabbitMQ")})
    assert server.alive() and worker.alive(), tails(processes)
