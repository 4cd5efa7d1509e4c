"""Bundles (several tasks in one work-queue message) under real faults: a worker SIGKILLed
while it runs tasks of a bundle, and a poison task (it SIGKILLs its own worker, every
time) inside a bundle. RabbitMQ returns the whole message redelivered; the next worker
splits it into single suspect messages before anything runs, so nothing is lost and the
poison is dead-lettered alone, its neighbours never with it."""
from __future__ import annotations

import pytest

import qm
from qm.testing.rabbitmq import free_port
from tests.bundling import bundle_waiting_tasks, scrape_counter
from tests.faults.support import Watcher, spawn_worker, statuses, tails
from tests.faults.test_poison import LIMIT_ENV, SETTLE_TIMEOUT_S, check_poison, keep_a_worker_running
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

#: Bound on tasks reaching a state, or a log line appearing (the machine may be busy).
WAIT_S = 90.0
SPLIT_LINE = r"split a redelivered bundle into (?P<count>\d+) suspect tasks"


def test_a_bundle_whose_worker_is_killed_mid_run_is_split_and_nothing_is_lost(rabbitmq, launcher, gates):
    """Two gated tasks of a bundle of six run when the worker is SIGKILLed; the next worker
    gets the bundle back, splits it, and every task ends SUCCEEDED with its own result."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    with qm.Client(server.address) as client:
        shut = [gates(), gates()]
        payloads = [gate.payload for gate in shut] + [f"echo-{n}" for n in range(4)]
        ids = [client.submit("test.wait_for", p, queue=queue) for p in payloads[:2]]
        ids += [client.submit("test.echo", p, queue=queue) for p in payloads[2:]]
        assert bundle_waiting_tasks(rabbitmq.url, queue, len(ids)) == ids
        first = spawn_worker(launcher, rabbitmq.url, queue)
        wait_until(lambda: all(client.status(task_id).state == "RUNNING" for task_id in ids[:2]), WAIT_S,
                   message=f"the gated tasks running\n{tails([first, server])}")
        first.kill()
        second = spawn_worker(launcher, rabbitmq.url, queue)
        split = second.wait_for_line(SPLIT_LINE, WAIT_S)
        assert int(split.group("count")) == len(ids), second.logs
        for gate in shut:
            gate.open()
        final = {status.task_id: status for status in client.results(ids, timeout_s=WAIT_S)}
    assert [(final[i].state, final[i].result) for i in ids] == [("SUCCEEDED", p) for p in payloads], \
        tails([first, second, server])


def test_a_poison_task_in_a_bundle_is_dead_lettered_alone(rabbitmq, launcher):
    """The poison kills the worker holding the bundle; split, it runs alone as a suspect
    until the servers have counted broker.delivery_limit starts; its five neighbours in
    the bundle end SUCCEEDED and none is dead-lettered with it."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env=LIMIT_ENV)
    with qm.Client(server.address) as client:
        poison = client.submit("test.kill_worker", "", queue=queue)
        neighbours = {client.submit("test.echo", f"n-{n}", queue=queue): f"n-{n}" for n in range(5)}
        bundle_waiting_tasks(rabbitmq.url, queue, 1 + len(neighbours))
        watcher = Watcher(server.address, [poison, *neighbours], timeout_s=SETTLE_TIMEOUT_S)
        workers = keep_a_worker_running(launcher, rabbitmq, queue, watcher, server)
        final = statuses(client, [poison, *neighbours])
        dead, _total = client.dead_letters()
    check_poison(poison, final, dead, workers, server)
    assert {letter.task_id for letter in dead} == {poison}, (dead, tails(workers + [server]))
    assert {i: (final[i].state, final[i].result) for i in neighbours} == {
        i: ("SUCCEEDED", payload) for i, payload in neighbours.items()
    }, tails(workers + [server])
    assert any("split a redelivered bundle" in worker.logs for worker in workers), tails(workers)


def test_bundles_a_server_made_survive_a_worker_killed_mid_run(rabbitmq, launcher):
    """Two workers, 3,000 tiny tasks through submit_many, which the server sends in bundles;
    one worker is SIGKILLed while they run. What it held comes back to the other (its
    bundles are split there); every task ends SUCCEEDED with its own result."""
    queue = launcher.queue(rabbitmq.url)
    metrics_port = free_port()
    server = launcher.server(rabbitmq.url, extra_args=["--metrics-port", str(metrics_port)])
    doomed = spawn_worker(launcher, rabbitmq.url, queue)
    survivor = spawn_worker(launcher, rabbitmq.url, queue)
    with qm.Client(server.address) as client:
        warm = [client.submit("test.echo", f"warm-{n}", queue=queue) for n in range(4)]
        assert {s.state for s in client.results(warm, timeout_s=WAIT_S)} == {"SUCCEEDED"}  # echo is tiny now
        payloads = [f"b-{n}" for n in range(3000)]
        ids = client.submit_many([("test.echo", p) for p in payloads], queue=queue)
        watcher = Watcher(server.address, ids, timeout_s=SETTLE_TIMEOUT_S)
        wait_until(lambda: watcher.terminal_count() >= 200, WAIT_S, message="200 tasks done")
        assert watcher.terminal_count() < len(ids), "every task ended before the kill: nothing was tested"
        doomed.kill()
        final = {status.task_id: status for status in client.results(ids, timeout_s=SETTLE_TIMEOUT_S)}
    assert scrape_counter(metrics_port, "qm_server_bundled_tasks_total") > 0
    wrong = [(i, final[i].state, final[i].result) for i, p in zip(ids, payloads, strict=True)
             if (final[i].state, final[i].result) != ("SUCCEEDED", p)]
    assert not wrong, (wrong[:5], tails([doomed, survivor, server]))
    # Whether the killed worker held a bundle at that moment is the broker's timing; the
    # split itself is pinned down by the hand-made kill test above. Reported, as the
    # other fault scenarios report their counts.
    splits = survivor.logs.count("split a redelivered bundle")
    print(f"\n[faults] server-made bundles, worker kill -9: tasks={len(ids)}, "
          f"bundled={scrape_counter(metrics_port, 'qm_server_bundled_tasks_total'):.0f}, "
          f"bundles split by the survivor={splits}", flush=True)
