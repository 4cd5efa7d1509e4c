"""Deliveries a worker gives back on purpose are not poison suspects (issue 9).

A worker returns unstarted deliveries when auto prefetch drops (tasks turned long) and when
it drains. Returned with basic.nack(requeue) they came back `redelivered`, and every
redelivered task runs alone (qm/worker/isolation.py): a child idled for a whole task each
time. They now go back as confirmed copies and run side by side again; a task whose worker
was killed still comes back redelivered and still runs alone.

Real qm-server and qm-worker processes on the shared RabbitMQ node, one logical queue per
test. Every task here is gated (`test.wait_for`): "ran side by side" is two tasks RUNNING at
once while both gates are shut, "ran alone" is one starting only after the other finished;
neither depends on the machine's speed.
"""
from __future__ import annotations

import signal

import qm
from tests.processes import kill_all, wait_until

#: Bound on one task reaching a state, or a log line appearing (the machine may be busy).
WAIT_S = 60.0
#: Bound on a signalled worker exiting.
EXIT_TIMEOUT_S = 30.0
GIVING_BACK = r"giving back \d+ waiting deliveries \(tasks (?P<ids>[^)]*)\)"


def logs(*processes) -> str:
    return "\n".join(process.logs for process in processes)


def wait_terminal(client: qm.Client, task_id: str):
    for status in client.watch([task_id], timeout_s=WAIT_S):
        if status.terminal:
            return status
    raise AssertionError(f"the stream of task {task_id} ended before a terminal state")


def wait_running_together(client: qm.Client, task_ids: list[str], processes) -> None:
    """Every task in `task_ids` is RUNNING at the same time (their gates are shut)."""
    wait_until(lambda: all(client.status(task_id).state == "RUNNING" for task_id in task_ids), WAIT_S,
               message=f"tasks {task_ids} running side by side\n{logs(*processes)}")


def test_deliveries_given_back_on_a_prefetch_drop_run_side_by_side(rabbitmq, launcher, gates):
    """Tiny tasks raise auto prefetch to 16 per child; then eight gated tasks arrive, all
    buffered in the one worker. Two run; once one has run for LONG_TASK_S the prefetch drops
    to 1 per child and the worker gives back what waits beyond it (the log names them).
    Every other gate is opened; two given-back tasks must then run on both children at
    once, as ordinary tasks, not one by one as suspects. Which deliveries wait and which run
    depends on the broker's delivery order, so the test takes the given-back ids from the log.
    Eight tasks, so that at least two wait even if the consumer swap that raised the
    prefetch had some in flight (RabbitMQ returns those redelivered: suspects, kept here)."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    with qm.Client(server.address) as client:
        for n in range(40):  # tiny tasks until the auto prefetch is at 16 per child
            assert wait_terminal(client, client.submit("test.echo", str(n), queue=queue)).state == "SUCCEEDED"
            if "prefetch now 32 per queue" in worker.stderr:
                break
        assert "prefetch now 32 per queue" in worker.stderr, worker.logs
        gate_of = {}
        for _ in range(8):
            gate = gates()
            gate_of[client.submit("test.wait_for", gate.payload, queue=queue)] = gate
        ids = list(gate_of)

        given_back = worker.wait_for_line(GIVING_BACK, WAIT_S).group("ids").split(", ")
        assert len(given_back) >= 2 and set(given_back) <= set(ids), (given_back, worker.logs)
        for task_id in ids:
            if task_id not in given_back:
                gate_of[task_id].open()
        wait_until(lambda: sum(client.status(task_id).state == "RUNNING" for task_id in given_back) == 2, WAIT_S,
                   message=f"two of the given-back tasks {given_back} running side by side\n{logs(server, worker)}")
        for task_id in given_back:
            gate_of[task_id].open()
        done = [wait_terminal(client, task_id) for task_id in ids]

    assert [status.state for status in done] == ["SUCCEEDED"] * 8, logs(server, worker)
    assert all(status.attempts == 1 and status.worker == worker.worker_id for status in done), done


def test_deliveries_given_back_by_a_drain_run_side_by_side_on_the_next_worker(rabbitmq, launcher, gates):
    """A worker with a fixed prefetch of 4 and 2 children runs two gated tasks and holds
    two more; SIGTERM gives those two back. The next worker must run them at once."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    first = launcher.worker(rabbitmq.url, procs=2, queues=queue, extra_args=["--prefetch", "4"])
    task_gates = [gates() for _ in range(4)]
    with qm.Client(server.address) as client:
        ids = [client.submit("test.wait_for", gate.payload, queue=queue) for gate in task_gates]
        wait_running_together(client, ids[:2], [server, first])

        first.signal(signal.SIGTERM)
        first.wait_for_line(r"draining: waiting up to \S+ s for 2 running task\(s\)", EXIT_TIMEOUT_S)
        for gate in task_gates[:2]:
            gate.open()
        assert first.wait(EXIT_TIMEOUT_S) == 0, first.logs
        assert [client.status(task_id).state for task_id in ids[2:]] == ["QUEUED"] * 2, first.logs

        second = launcher.worker(rabbitmq.url, procs=2, queues=queue)
        wait_running_together(client, ids[2:], [server, first, second])
        for gate in task_gates[2:]:
            gate.open()
        done = [wait_terminal(client, task_id) for task_id in ids]

    assert [status.state for status in done] == ["SUCCEEDED"] * 4, logs(server, first, second)
    assert [status.worker for status in done] == [first.worker_id] * 2 + [second.worker_id] * 2, done
    assert all(status.attempts == 1 for status in done), done


def test_a_task_whose_worker_was_killed_still_runs_alone(rabbitmq, launcher, gates):
    """kill -9 of a worker while it runs a gated task: that task comes back redelivered and
    may be what killed the worker, so on the next worker it runs alone; an ordinary task
    queued behind it starts only after it finished (or finishes before it starts)."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    first = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    suspect_gate, other_gate = gates(), gates()
    with qm.Client(server.address) as client:
        suspect = client.submit("test.wait_for", suspect_gate.payload, queue=queue)
        wait_until(lambda: client.status(suspect).state == "RUNNING", WAIT_S, message="the task running")
        family = first.descendants()
        first.kill()
        kill_all(family)
        other = client.submit("test.wait_for", other_gate.payload, queue=queue)

        second = launcher.worker(rabbitmq.url, procs=2, queues=queue)

        def started_here(task_id: str) -> bool:
            status = client.status(task_id)
            return status.state == "RUNNING" and status.worker == second.worker_id

        # one of the two starts on the new worker; the other must wait for it to finish
        wait_until(lambda: started_here(suspect) or started_here(other), WAIT_S,
                   message=f"a task starting on the new worker\n{logs(server, second)}")
        order = [suspect, other] if started_here(suspect) else [other, suspect]
        gate_of = {suspect: suspect_gate, other: other_gate}
        gate_of[order[0]].open()
        first_done = wait_terminal(client, order[0])
        gate_of[order[1]].open()
        second_done = wait_terminal(client, order[1])

    assert (first_done.state, second_done.state) == ("SUCCEEDED", "SUCCEEDED"), logs(server, second)
    assert second_done.started_at >= first_done.finished_at, \
        f"the redelivered task ran next to another: {first_done}\n{second_done}\n{logs(second)}"
