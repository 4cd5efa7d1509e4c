"""Events in packs through the real system (qm-server, qm-worker, RabbitMQ): a burst's
outcome events reach the servers in fewer messages than tasks, and every task still ends
with its own result."""
from __future__ import annotations

import time

import pika

from qm.broker import topology
from qm.messages import TaskEvent

#: Bound on the burst finishing, and on its events reaching the tap.
BURST_TIMEOUT_S = 120.0
TASKS = 300


def test_a_burst_s_events_arrive_packed_and_every_task_ends_with_its_own_result(stack):
    with pika.BlockingConnection(pika.URLParameters(stack.broker_url)) as connection:
        channel = connection.channel()
        tap = channel.queue_declare("", exclusive=True).method.queue  # beside the server's queue
        channel.queue_bind(tap, topology.EVENTS_EXCHANGE)

        ids = stack.client.submit_many([("math", f"{n} * 3") for n in range(TASKS)], queue=stack.queue)
        finals = {status.task_id: status for status in stack.client.results(ids, timeout_s=BURST_TIMEOUT_S)}
        assert {task_id: (finals[task_id].state, finals[task_id].result) for task_id in ids} == {
            task_id: ("SUCCEEDED", str(n * 3)) for n, task_id in enumerate(ids)
        }, stack.worker.logs

        ours = set(ids)
        messages = events = 0
        finished: set[str] = set()
        deadline_s = time.monotonic() + BURST_TIMEOUT_S
        while finished != ours and time.monotonic() < deadline_s:  # other tests' events pass by too
            _method, _properties, body = channel.basic_get(tap, auto_ack=True)
            if body is None:
                connection.sleep(0.05)
                continue
            mine = [event for event in TaskEvent.decode_all(body) if event.task_id in ours]
            if mine:
                messages += 1
                events += len(mine)
                finished.update(event.task_id for event in mine if event.state.terminal)
    assert finished == ours, f"{len(ours - finished)} outcome events never seen"
    assert messages < events, f"{events} events of the burst in {messages} messages: none packed"
