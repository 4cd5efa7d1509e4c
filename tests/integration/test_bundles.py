"""Bundles on real processes and a real RabbitMQ: several tiny tasks in one work-queue
message. A worker runs every task of a bundle to its own right result and acks the
message once; a server bundles `submit_many`'s tiny tasks only for queues whose every
worker reads bundles; a bundle an older worker rejects still runs, one task a message."""
from __future__ import annotations

import time

import pika

import qm
from qm.broker import topology
from qm.messages import Heartbeat
from qm.protocol import Header
from qm.testing.rabbitmq import free_port
from tests.bundling import bundle_waiting_tasks, messages_on, scrape_counter
from tests.processes import unique, wait_until

#: Bound on the tasks reaching their final states, and on a heartbeat being heard.
WAIT_S = 120.0
#: Most batches of 200 tiny tasks before one must have gone in bundles.
MAX_BATCHES = 5


def bundled_tasks(metrics_port: int) -> float:
    return scrape_counter(metrics_port, "qm_server_bundled_tasks_total")


def server_with_metrics(launcher, rabbitmq):
    port = free_port()
    return launcher.server(rabbitmq.url, extra_args=["--metrics-port", str(port)]), port


def warm_up(client: qm.Client, queue: str) -> None:
    """A few tiny tasks run to the end: the server has seen `math` runs are tiny."""
    ids = [client.submit("math", f"{n} + 1", queue=queue) for n in range(5)]
    assert {status.state for status in client.results(ids, timeout_s=WAIT_S)} == {"SUCCEEDED"}


def send_heartbeat(broker_url: str, beat: Heartbeat) -> None:
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(topology.HEARTBEATS_EXCHANGE, "", beat.encode(), mandatory=False)


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


def test_submit_many_sends_tiny_tasks_in_bundles_to_workers_that_read_them(rabbitmq, launcher):
    """After a few tiny runs the server bundles `submit_many`'s tasks. How many runs it
    takes depends on the runs' times (a loaded host can stretch one, and the mean must
    fall under 5 ms), so batches go until one is bundled, within MAX_BATCHES."""
    queue = launcher.queue(rabbitmq.url)
    server, metrics_port = server_with_metrics(launcher, rabbitmq)
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    with qm.Client(server.address) as client:
        warm_up(client, queue)
        assert bundled_tasks(metrics_port) == 0  # single submits are never bundled
        for batch in range(MAX_BATCHES):
            ids = client.submit_many([("math", f"{n} * {batch}") for n in range(200)], queue=queue)
            final = {status.task_id: status for status in client.results(ids, timeout_s=WAIT_S)}
            assert [(final[i].state, final[i].result) for i in ids] == [
                ("SUCCEEDED", str(n * batch)) for n in range(200)]
            if bundled_tasks(metrics_port) > 0:
                break
    assert bundled_tasks(metrics_port) > 0, f"no task of {MAX_BATCHES} batches of 200 went in a bundle"


def test_no_bundles_while_a_worker_of_the_queue_cannot_read_them(rabbitmq, launcher):
    """A worker older than bundles (its heartbeat names no features) consumes the queue too:
    the server sends one task a message, and every task runs."""
    queue = launcher.queue(rabbitmq.url)
    server, metrics_port = server_with_metrics(launcher, rabbitmq)
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    with qm.Client(server.address) as client:
        warm_up(client, queue)
        old = Heartbeat(unique("old-worker"), "elsewhere", 1, 2, 0, (queue,), ("math",), "0.1.0")
        send_heartbeat(rabbitmq.url, old)
        wait_until(lambda: any(w.worker_id == old.worker_id for w in client.workers()), WAIT_S,
                   message="the older worker's heartbeat heard")
        ids = client.submit_many([("math", f"{n} - 1") for n in range(200)], queue=queue)
        final = {status.task_id: status for status in client.results(ids, timeout_s=WAIT_S)}
    assert [(final[i].state, final[i].result) for i in ids] == [("SUCCEEDED", str(n - 1)) for n in range(200)]
    assert bundled_tasks(metrics_port) == 0


def test_a_bundle_an_older_worker_rejects_runs_one_task_a_message(rabbitmq, launcher):
    """An older worker rejects a bundle as undecodable (basic.nack, no requeue): RabbitMQ
    dead-letters it, and the server publishes its tasks again one a message instead of
    recording them as dead letters."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    with qm.Client(server.address) as client:
        ids = [client.submit("math", f"{n} * 5", queue=queue) for n in range(4)]
        bundle_waiting_tasks(rabbitmq.url, queue, len(ids))
        with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
            channel = connection.channel()
            method, properties, _body = channel.basic_get(topology.work_queue_name(queue), auto_ack=False)
            assert method is not None and properties.headers[Header.BUNDLE] == 4
            channel.basic_nack(method.delivery_tag, requeue=False)  # what a worker older than bundles does
        deadline = time.monotonic() + WAIT_S
        while messages_on(rabbitmq.url, queue) < 4:
            assert time.monotonic() < deadline, server.logs
            time.sleep(0.1)
        launcher.worker(rabbitmq.url, procs=2, queues=queue)
        final = {status.task_id: status for status in client.results(ids, timeout_s=WAIT_S)}
        dead, total = client.dead_letters()
    assert [(final[i].state, final[i].result) for i in ids] == [("SUCCEEDED", str(n * 5)) for n in range(4)]
    assert total == 0, dead
    assert "a worker rejected a bundle of 4 tasks" in server.logs
