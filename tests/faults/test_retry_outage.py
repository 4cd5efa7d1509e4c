"""Scenario 6 (issue #15, part 1): RabbitMQ goes down, gracefully or by SIGKILL, while
tasks wait for their next attempt in several delay tiers at once, and stays down longer
than their delays, so every delay ends while the node is down or booting. Some of the
waiting tasks fail for good on their next attempt (they are dead-lettered after the
outage); others fail for good just as the node goes down.

What a user must see afterwards: every flaky task (fails its first run) SUCCEEDED, every
always-failing task FAILED and listed in the dead letters, none left RETRYING: 0 lost.

This used to fail (support.RETRY_LOST): the delay tiers were classic queues whose
expired messages RabbitMQ dead-lettered to the work queue at most once, so a message
expiring while the work queue was unavailable (node stopping, booting) was dropped, and
its task stayed RETRYING for good with its next attempt long past.
"""
from __future__ import annotations

import re
import time
import uuid

import pytest

import qm
from qm.retry import tier_for
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
    Spec,
    TasksNotFinished,
    Watcher,
    check_and_report,
    counts_by_kind,
    print_kinds,
    statuses,
    submit_all,
    tails,
    unfinished,
    wait_dead_letters,
    wait_settled,
)
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

#: Retry delays (= their delay tiers) the tasks wait in when the node goes down, longest
#: first: they are submitted in this order, so the short ones are still waiting at the end.
DELAYS_S = (10, 5, 2, 1)
#: Per delay: tasks failing their first run only (test.flaky), and tasks always failing
#: with one retry (their last attempt fails after the outage and is dead-lettered).
FLAKY_PER_DELAY = 6
FAILING_PER_DELAY = 3
#: Always-failing tasks without retries, submitted last: dead-lettered as the node goes down.
FAILING_NOW = 6
#: How long the node stays down (after stop/kill returned, before start): longer than
#: the longest delay, so every waiting delay ends while it is down or booting.
DOWN_S = 11.0
#: What test.flaky returns (the run number grows if a run was repeated by a redelivery).
SUCCEEDED_ON_A_RUN = re.compile(r"succeeded on run \d+")
#: Reconnect backoff cap for this test's processes (a real setting).
FAST_RECONNECT = {"QM_BROKER__RECONNECT_MAX_DELAY_S": "1"}
#: Bounds: the warm-up; tasks reaching their retry wait; the processes reconnecting; dead
#: letters listed.
WARM_UP_TIMEOUT_S = 90.0
WAITING_TIMEOUT_S = 60.0
RECONNECT_TIMEOUT_S = 60.0
DEAD_LETTERS_TIMEOUT_S = 20.0
#: No task finishing for this long after the outage: the rest are lost (a next attempt is
#: due at most max(DELAYS_S) after the restart).
STALL_S = 30.0


def warm_up(counter_dir) -> list[Spec]:
    """One task through each delay tier (it fails once, then succeeds). The test waits for
    them before the workload, so the work queue and every delay queue have existed for about
    max(DELAYS_S) when the node is killed: RabbitMQ 3.10 (Ra 2.2) does not recover a quorum
    queue declared less than about 3 s before a SIGKILL of its node (no leader after the
    restart: its messages are gone, consumers time out), which is not the loss under test."""
    run = uuid.uuid4().hex[:8]
    return [Spec("test.flaky", f"{counter_dir / f'{run}-warm-up-{delay_s}'}:1", SUCCEEDED_ON_A_RUN,
                 f"{run}-warm-up-{delay_s}", kind="warm-up",
                 options={"max_retries": 2, "retry_backoff_s": float(delay_s), "retry_jitter": False})
            for delay_s in DELAYS_S]


def workload(counter_dir) -> list[Spec]:
    """Longest delays first; then the tasks without retries (see the constants)."""
    run = uuid.uuid4().hex[:8]
    specs = []
    for delay_s in DELAYS_S:
        retry = {"retry_backoff_s": float(delay_s), "retry_jitter": False}
        for i in range(FLAKY_PER_DELAY):
            key = f"{run}-flaky-{delay_s}-{i}"
            specs.append(Spec("test.flaky", f"{counter_dir / key}:1", SUCCEEDED_ON_A_RUN, key,
                              kind=f"flaky, waits {delay_s}s", options={"max_retries": 2, **retry}))
        for i in range(FAILING_PER_DELAY):
            key = f"{run}-failing-{delay_s}-{i}"
            specs.append(Spec("test.fail", key, None, key, state="FAILED", kind=f"failing, waits {delay_s}s",
                              options={"max_retries": 1, **retry}))
    for i in range(FAILING_NOW):
        key = f"{run}-failing-now-{i}"
        specs.append(Spec("test.fail", key, None, key, state="FAILED", kind="failing, no retry",
                          options={"max_retries": 0}))
    return specs


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_tasks_waiting_for_a_retry_survive_a_rabbitmq_outage(own_rabbitmq, launcher, tmp_path, how):
    assert [tier_for(delay_s) for delay_s in DELAYS_S] == list(DELAYS_S), "each delay is a tier of its own"
    queue = launcher.queue(own_rabbitmq.url)
    launcher.forget_queues(own_rabbitmq.url)  # the private node is gone before teardown
    server = launcher.server(own_rabbitmq.url, env=FAST_RECONNECT)
    worker = launcher.worker(own_rabbitmq.url, procs=2, queues=queue, env=FAST_RECONNECT)
    processes = [worker, server]
    name = f"retries across rabbitmq {how}"

    with qm.Client(server.address) as client:
        warmed = submit_all(client, warm_up(tmp_path), queue)
        warming = Watcher(server.address, warmed)
        wait_settled(warming, WARM_UP_TIMEOUT_S, processes)
        accepted = submit_all(client, workload(tmp_path), queue)
        watcher = Watcher(server.address, accepted)
        retrying = [task_id for task_id, spec in accepted.items() if spec.options["max_retries"] > 0]
        # Every task with retries has failed its first run and waits (or already ran again).
        failed_once = {"RETRYING", "SUCCEEDED", "FAILED"}
        wait_until(lambda: all(watcher.seen(task_id, failed_once) for task_id in retrying), WAITING_TIMEOUT_S,
                   interval_s=0.02, message="every task with retries failed its first run")

        marks = {process: process.line_count() for process in processes}
        waiting = {task_id for task_id in retrying if watcher.last_state(task_id) == "RETRYING"}
        getattr(own_rabbitmq, how)()  # stop(): graceful; kill(): SIGKILL of the node
        time.sleep(DOWN_S)  # the fault itself: the node stays down while the delays end
        own_rabbitmq.start()
        for process in processes:
            process.wait_for_line(r"connected to RabbitMQ", RECONNECT_TIMEOUT_S, start=marks[process])

        try:
            wait_settled(watcher, SETTLE_TIMEOUT_S, processes, stall_s=STALL_S)
        except TasksNotFinished as stuck:
            raise unfinished(name, accepted, statuses(client, accepted), [worker], stuck,
                             {"waiting_at_outage": waiting}) from None
        accepted = {**warmed, **accepted}
        final = statuses(client, accepted)
        failing = {task_id for task_id, spec in accepted.items() if spec.state == "FAILED"}
        dead = wait_dead_letters(client, failing, DEAD_LETTERS_TIMEOUT_S) & set(accepted)

    print_kinds(name, counts_by_kind(accepted, final, [worker], {"waiting_at_outage": waiting}))
    check_and_report(name, accepted, [warming, watcher], final, [worker], logs_of=[server], extra={
        "waiting_at_outage": len(waiting), "dead_letters": len(dead),
        "server_reconnects": server.stderr.count("lost connection to RabbitMQ"),
        "worker_reconnects": worker.stderr.count("lost connection to RabbitMQ")})
    # Every task that failed for good is in the dead letters; no task that succeeded is.
    assert sorted(failing - dead) == [], f"FAILED tasks missing from the dead letters\n{tails(processes)}"
    assert sorted(dead - failing) == [], "tasks that succeeded are listed as dead letters"
    assert server.alive() and worker.alive(), tails(processes)

