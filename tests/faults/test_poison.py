"""Scenario 5: a poison task (test.kill_worker SIGKILLs its own qm-worker, every time)
among ordinary tasks on one queue. Workers are restarted as they die (bounded); after
broker.delivery_limit=3 recorded starts the poison is dead-lettered and recorded CRASHED,
and every other task completes.

This used to fail (NEIGHBOURS_DEAD_LETTERED): RabbitMQ counts every return toward
x-delivery-limit, so tasks prefetched or running next to the poison came back with it to
each next worker and were dead-lettered with it. Now redelivered tasks run alone and the
servers count starts, not deliveries; these tests guard that.
"""
from __future__ import annotations

import time

import pytest

import qm
from tests.faults.support import (
    Spec,
    Watcher,
    check_and_report,
    mixed_workload,
    spawn_worker,
    statuses,
    submit_all,
    tails,
    wait_settled,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

DELIVERY_LIMIT = 3
LIMIT_ENV = {"QM_BROKER__DELIVERY_LIMIT": str(DELIVERY_LIMIT)}
TASKS = 100
#: Worker (re)starts allowed: the poison may kill delivery_limit + 1 of them.
MAX_WORKER_STARTS = DELIVERY_LIMIT + 4
#: Bound on the whole scenario settling.
SETTLE_TIMEOUT_S = 150.0

NEIGHBOURS_DEAD_LETTERED = (
    "BUG: tasks held by a worker next to a poison task are dead-lettered with it: each worker "
    "death returns them too, RabbitMQ counts those returns toward x-delivery-limit, and the quorum "
    "queue redelivers returned messages first, so the same neighbours ride along with the poison "
    "until the limit and end CRASHED ('RabbitMQ dead-lettered task ...: delivered 3 times without "
    "finishing') though they never failed; one whose result was reported but not yet acked stays "
    "SUCCEEDED yet is listed as a dead letter too (so a dead-letter requeue would run it again)")


class NeighboursDeadLettered(AssertionError):
    """Tasks other than the poison were dead-lettered by the delivery limit."""


def keep_a_worker_running(launcher, rabbitmq, queue: str, watcher: Watcher, server) -> list:
    """Start a worker, and a new one whenever the current one died (bounded), until every
    watched task is terminal; returns the workers started."""
    workers = [spawn_worker(launcher, rabbitmq.url, queue, env=LIMIT_ENV)]
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not watcher.finished and time.monotonic() < deadline:
        if not workers[-1].alive():
            assert len(workers) < MAX_WORKER_STARTS, \
                f"the poison killed {len(workers)} workers, over the delivery limit\n{tails(workers + [server])}"
            workers.append(spawn_worker(launcher, rabbitmq.url, queue, env=LIMIT_ENV))
        watcher.join(0.2)
    wait_settled(watcher, 5.0, workers + [server])
    return workers


def check_poison(poison: str, final, dead, workers, server) -> int:
    letters = {letter.task_id: letter for letter in dead}
    assert poison in letters, (dead, tails(workers + [server]))
    assert letters[poison].state == "CRASHED" and "delivery_limit" in letters[poison].reason, letters[poison]
    assert "dead-lettered" in final[poison].error, final[poison]
    killed = sum(1 for worker in workers if not worker.alive())
    # Each recorded start is a run that killed its worker, and the task is stopped only after
    # DELIVERY_LIMIT of them; one more death if a worker died before its first RUNNING event
    # reached RabbitMQ (docs/architecture.md, limits). Fewer would be an innocent task's start
    # counted, or the poison stopped before it reached its limit.
    assert DELIVERY_LIMIT <= killed <= DELIVERY_LIMIT + 1, \
        f"the poison killed {killed} workers (delivery limit {DELIVERY_LIMIT})\n{tails(workers + [server])}"
    return killed


def victims_of(poison: str, final, dead) -> dict[str, str]:
    """Tasks other than the poison that the delivery limit dead-lettered: id → error."""
    return {letter.task_id: final[letter.task_id].error for letter in dead
            if letter.task_id != poison and letter.task_id in final and "delivery_limit" in letter.reason}


def test_poison_task_is_dead_lettered_and_the_others_complete(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env=LIMIT_ENV)

    with qm.Client(server.address) as client:
        specs = mixed_workload(TASKS)
        accepted = submit_all(client, specs[:TASKS // 4], queue)
        poison_spec = Spec("test.kill_worker", "", "", f"poison-{time.time_ns()}")
        poison = client.submit(poison_spec.type, poison_spec.payload, queue=queue, idempotency_key=poison_spec.key)
        accepted[poison] = poison_spec
        accepted.update(submit_all(client, specs[TASKS // 4:], queue))
        watcher = Watcher(server.address, accepted, timeout_s=SETTLE_TIMEOUT_S)
        workers = keep_a_worker_running(launcher, rabbitmq, queue, watcher, server)
        final = statuses(client, accepted)
        dead, _total = client.dead_letters()

    victims = victims_of(poison, final, dead)
    # Everything else holds even when the bug hits. A victim ends CRASHED if it never
    # finished, or SUCCEEDED if its result was reported before a death (not acked yet) -
    # and is listed as a dead letter all the same.
    check_and_report("poison task", accepted, watcher, final, workers, logs_of=[server],
                     expected_state={poison: "CRASHED",
                                     **{task_id: {"CRASHED", "SUCCEEDED"} for task_id in victims}},
                     extra={"workers_killed_by_poison": sum(1 for worker in workers if not worker.alive()),
                            "worker_starts": len(workers), "dead_letters": len(dead),
                            "innocent_dead_lettered": len(victims)})
    check_poison(poison, final, dead, workers, server)
    assert {letter.task_id for letter in dead} <= {poison, *victims}, dead
    if victims:
        raise NeighboursDeadLettered(f"{NEIGHBOURS_DEAD_LETTERED}\n" + "\n".join(
            f"  {task_id} ({accepted[task_id].type} {accepted[task_id].payload!r}): final state "
            f"{final[task_id].state} {error!r}, "
            f"dead letter {[(d.state, d.reason) for d in dead if d.task_id == task_id]}"
            for task_id, error in victims.items()) + f"\n{tails([server])}")


def test_a_task_running_next_to_a_poison_task_is_not_dead_lettered_with_it(rabbitmq, launcher):
    """Made reproducible: a 5 s task submitted right after the poison is in every dying
    worker's first prefetch (2 with 2 children) and never finishes before the kill."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env=LIMIT_ENV)
    with qm.Client(server.address) as client:
        poison = client.submit("test.kill_worker", "", queue=queue)
        neighbour = client.submit("test.sleep", "5", queue=queue)
        watcher = Watcher(server.address, [poison, neighbour], timeout_s=SETTLE_TIMEOUT_S)
        workers = keep_a_worker_running(launcher, rabbitmq, queue, watcher, server)
        final = statuses(client, [poison, neighbour])
        dead, _total = client.dead_letters()

    killed = check_poison(poison, final, dead, workers, server)
    print(f"\n[faults] poison neighbour: workers_killed_by_poison={killed}, neighbour={final[neighbour].state} "
          f"(attempts {final[neighbour].attempts}): {final[neighbour].error}", flush=True)
    victims = victims_of(poison, final, dead)
    if victims:
        raise NeighboursDeadLettered(f"{NEIGHBOURS_DEAD_LETTERED}\nneighbour {neighbour} (test.sleep '5'): "
                                     f"{victims[neighbour]}\n{tails(workers + [server], 15)}")
    assert (final[neighbour].state, final[neighbour].result) == ("SUCCEEDED", "5"), final[neighbour]
