"""Make a bundle on a real RabbitMQ the way a server that bundles will publish one: take
the single task messages waiting on a work queue and put them back as one message
(messages.TaskBundle, header qm-bundle), confirmed before the singles are acked."""
from __future__ import annotations

import time
import urllib.request

import pika
from prometheus_client.parser import text_string_to_metric_families

from qm.broker import topology
from qm.messages import TaskMessage, encode_bundle
from qm.protocol import Header

#: Bound on the submitted messages being there to take.
TAKE_BOUND_S = 30.0


def bundle_waiting_tasks(broker_url: str, queue: str, count: int) -> list[str]:
    """Replace the first `count` messages of `queue`'s default work queue (no worker may
    consume it yet) by one bundle message of them, in order; return their task ids."""
    work_queue = topology.work_queue_name(queue)
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        taken: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + TAKE_BOUND_S
        while len(taken) < count:
            assert time.monotonic() < deadline, f"only {len(taken)} of {count} messages on {work_queue}"
            method, _properties, body = channel.basic_get(work_queue, auto_ack=False)
            if method is None:
                connection.sleep(0.05)
                continue
            taken.append((method.delivery_tag, body))
        bodies = [body for _tag, body in taken]
        channel.basic_publish(
            topology.TASKS_EXCHANGE,
            topology.routing_key(queue),
            encode_bundle(bodies),
            pika.BasicProperties(delivery_mode=2, headers={Header.BUNDLE: len(bodies)}),
            mandatory=True,
        )
        channel.basic_ack(taken[-1][0], multiple=True)
    return [TaskMessage.decode(body).task_id for body in bodies]


def scrape_counter(metrics_port: int, name: str) -> float:
    """A counter of qm-server's /metrics (e.g. qm_server_bundled_tasks_total)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is missing from /metrics")


def messages_on(broker_url: str, queue: str) -> int:
    """Messages ready on `queue`'s default work queue."""
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        declared = connection.channel().queue_declare(topology.work_queue_name(queue), passive=True)
        return declared.method.message_count
