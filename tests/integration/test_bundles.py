"""Bundles on real processes and a real RabbitMQ: a worker runs every task of a bundle
message (several tasks in one message, as servers will send tiny tasks) to its own right
result, acks it once, and tells the servers it reads bundles."""
from __future__ import annotations

import qm
from tests.bundling import bundle_waiting_tasks, messages_on

#: Bound on the tasks reaching their final states.
WAIT_S = 120.0


def test_a_worker_runs_every_task_of_a_bundle_and_acks_it(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    with qm.Client(server.address) as client:
        expressions = [f"{n} * 7" for n in range(8)]
        ids = [client.submit("math", expression, queue=queue) for expression in expressions]
        assert bundle_waiting_tasks(rabbitmq.url, queue, len(ids)) == ids
        assert messages_on(rabbitmq.url, queue) == 1
        worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
        final = {status.task_id: status for status in client.results(ids, timeout_s=WAIT_S)}
        assert [(final[i].state, final[i].result) for i in ids] == [("SUCCEEDED", str(n * 7)) for n in range(8)]
        worker.stop()  # a message still unacked would go back to the queue now
        assert messages_on(rabbitmq.url, queue) == 0, worker.logs
        assert "bundle" not in worker.logs  # nothing split, rejected or returned
