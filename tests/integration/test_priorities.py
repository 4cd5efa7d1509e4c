"""Priorities with real processes: qm-server, qm-worker --procs 2, RabbitMQ 3.10 quorum queues.

A burst of low-priority tasks does not hold back a high-priority one by more than one task
per child; a worker killed with -9 while holding both gives them back, and the next one
starts the high one first. Orders are read from the start times the worker recorded
(`started_at` in each status), never from how fast anything ran.
"""
from __future__ import annotations

import os
import signal

import grpc
import pika
import psutil
import pytest

import qm
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from tests.processes import run_qm, wait_until, worker_status

pytestmark = [pytest.mark.timeout(300)]

PROCS = 2
#: Low-priority tasks in the burst, and how long each sleeps (the issue's "task time").
BURST = 30
TASK_S = "0.3"
#: Bound on all the tasks of a test finishing, and on one state or log line showing up.
SETTLE_S = 180.0
WAIT_S = 60.0


def ready_messages(broker_url: str, amqp_queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        return connection.channel().queue_declare(amqp_queue, passive=True).method.message_count


def finals(client: qm.Client, task_ids: list[str]) -> dict:
    done = {status.task_id: status for status in client.results(task_ids, timeout_s=SETTLE_S)}
    assert all(status.state == "SUCCEEDED" for status in done.values()), done
    return done


def test_held_low_priority_deliveries_never_start_before_a_high_priority_task(rabbitmq, launcher, gates):
    """Both children are held by gated tasks while 30 low tasks and then one high task are
    queued; the worker holds 8 deliveries per band (--prefetch 8), so it holds lows that came
    before the high. Once the gates open, the high task is the next to start: no low task
    of the burst starts before it."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=PROCS, queues=queue, prefetch=8)
    with qm.Client(server.address) as client:
        held = [gates() for _ in range(PROCS)]
        blockers = [client.submit("test.wait_for", gate.payload, queue=queue, priority=0) for gate in held]
        wait_until(lambda: all(client.status(t).state == "RUNNING" for t in blockers), WAIT_S,
                   message=f"both children busy\n{worker.logs}")
        burst = client.submit_many([("test.sleep", TASK_S)] * BURST, queue=queue, priority=0)
        high = client.submit("test.sleep", TASK_S, queue=queue, priority=9)
        assert client.status(high).priority == 9 and client.status(burst[0]).priority == 0
        # The high task has reached the worker (its band holds nothing ready any more).
        wait_until(lambda: ready_messages(rabbitmq.url, f"qm.tasks.{queue}.p7") == 0, WAIT_S,
                   message="the high-priority task delivered to the worker")
        for gate in held:
            gate.open()
        done = finals(client, [*blockers, *burst, high])

    high_start = done[high].started_at
    before = [task_id for task_id in burst if done[task_id].started_at < high_start]
    assert before == [], f"{len(before)} low tasks started before the high one\n{worker.logs}"


def test_a_burst_of_low_tasks_delays_a_high_one_by_at_most_one_task_per_child(rabbitmq, launcher):
    """The issue's scenario, auto prefetch: 30 low tasks of 0.3 s, then one high task. Of the
    lows, only those already started when the high one reached the worker, plus at most one
    per child (the task each was running when it arrived), may start before it.

    "Reached the worker" is made exact, not a guess at how fast a busy machine delivers: the
    worker, supervisor and children, is stopped (SIGSTOP) while the high task is submitted
    and RabbitMQ hands it over. Then the supervisor alone continues, and answers a status
    call sent after that: its loop has read what RabbitMQ sent meanwhile, the high task
    among it. Only then do the children continue. Nothing starts while they are stopped,
    so every low task stamped after the high one was accepted started after the worker had
    it. (With the children left running, a child that ended its task while the supervisor
    was stopped could be given a held low task before the supervisor read the high one.)"""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=PROCS, queues=queue)
    with qm.Client(server.address) as client:
        burst = client.submit_many([("test.sleep", TASK_S)] * BURST, queue=queue, priority=0)
        wait_until(lambda: any(client.status(t).state != "QUEUED" for t in burst), WAIT_S,
                   message=f"the burst started\n{worker.logs}")
        os.kill(worker.pid, signal.SIGSTOP)
        children = psutil.Process(worker.pid).children(recursive=True)
        for child in children:
            child.suspend()
        try:
            high = client.submit("test.sleep", TASK_S, queue=queue, priority=9)
            wait_until(lambda: ready_messages(rabbitmq.url, f"qm.tasks.{queue}.p7") == 0, WAIT_S,
                       message="RabbitMQ handing the high-priority task to the worker")
            os.kill(worker.pid, signal.SIGCONT)
            worker_status(worker, timeout_s=WAIT_S)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
            for child in children:
                child.resume()
        done = finals(client, [*burst, high])

    accepted_at, high_start = done[high].created_at, done[high].started_at
    already = [t for t in burst if done[t].started_at <= accepted_at]
    overtaking = [t for t in burst if accepted_at < done[t].started_at < high_start]
    assert len(overtaking) <= PROCS, (
        f"{len(overtaking)} low tasks started after the high one reached the worker and before it started "
        f"(already started before: {len(already)})\n{worker.logs}")
    assert len(already) + len(overtaking) < BURST  # the high one did not simply wait its turn


def test_kill_9_of_a_worker_holding_priority_tasks_loses_none_and_the_next_runs_high_first(
        rabbitmq, launcher, gates):
    """Children held by gated low tasks; lows and then a high task wait in the worker (it
    holds them, unacked). kill -9: RabbitMQ returns all of them, redelivered (suspects, run
    one at a time). A new worker runs every task, the high-priority one before any low one."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    doomed = launcher.worker(rabbitmq.url, procs=PROCS, queues=queue, prefetch=4)
    with qm.Client(server.address) as client:
        held = [gates() for _ in range(PROCS)]
        blockers = [client.submit("test.wait_for", gate.payload, queue=queue, priority=1) for gate in held]
        wait_until(lambda: all(client.status(t).state == "RUNNING" for t in blockers), WAIT_S,
                   message=f"both children busy\n{doomed.logs}")
        lows = client.submit_many([("test.sleep", "0.2")] * 6, queue=queue, priority=2)
        high = client.submit("test.sleep", "0.2", queue=queue, priority=8)
        wait_until(lambda: ready_messages(rabbitmq.url, f"qm.tasks.{queue}.p7") == 0, WAIT_S,
                   message="the high-priority task held by the doomed worker")
        doomed.kill()
        for gate in held:
            gate.open()  # their next run (on the new worker) ends at once
        survivor = launcher.worker(rabbitmq.url, procs=PROCS, queues=queue)
        done = finals(client, [*blockers, *lows, high])

    first_low = min(done[t].started_at for t in [*blockers, *lows])
    assert done[high].started_at < first_low, f"\n{survivor.logs}"
    assert all(done[t].worker == survivor.worker_id for t in [*blockers, high]), done


def test_priority_is_shown_validated_and_defaulted_for_users(rabbitmq, launcher):
    """CLI --priority, `qm status` (text and JSON), `qm types`; gRPC priority 10 refused
    naming the field, nothing enqueued."""
    server = launcher.server(rabbitmq.url)
    queue = launcher.queue(rabbitmq.url)
    submitted = run_qm("submit", "-T", "test.echo", "-P", "x", "--queue", queue, "--priority", "7",
                       server=server.address)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    shown = run_qm("status", task_id, server=server.address)
    assert "priority  7" in shown.stdout, shown.stdout
    assert '"priority": 7' in run_qm("status", task_id, "--json", server=server.address).stdout
    bad = run_qm("submit", "-T", "test.echo", "-P", "x", "--priority", "10", server=server.address)
    assert bad.returncode != 0 and "--priority" in bad.stderr and "0 (lowest) to 9" in bad.stderr, bad.stderr
    types = run_qm("types", server=server.address).stdout
    assert "priority 5" in types, types

    with grpc.insecure_channel(server.address) as channel:
        stub = task_queue_pb2_grpc.TaskQueueStub(channel)
        request = task_queue_pb2.SubmitTaskRequest(type="test.echo", payload=b"x", queue=queue, priority=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitTask(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("priority:"), refused.value.details()
    assert ready_messages(rabbitmq.url, f"qm.tasks.{queue}.p7") == 1  # only the CLI's task


def test_delayed_and_requeued_tasks_return_to_their_priority_band(rabbitmq, launcher):
    """A delayed task waits in a delay tier and is dead-lettered back by RabbitMQ with its
    routing key: it must land in its band's queue (retries take the same way). A dead letter
    requeued goes back to its band too, with its priority."""
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    launcher.track_queue(rabbitmq.url, f"qm.dead.{server.server_id}")
    with qm.Client(server.address) as client:
        client.submit("test.echo", "declare the normal band", queue=queue)
        delayed = client.submit("test.echo", "later", queue=queue, priority=9, delay_s=1.0)
        wait_until(lambda: ready_messages(rabbitmq.url, f"qm.tasks.{queue}.p7") == 1, WAIT_S,
                   message="the delayed task back in the high band")
        assert ready_messages(rabbitmq.url, f"qm.tasks.{queue}") == 1  # only the first task
        assert client.status(delayed).priority == 9

        worker = launcher.worker(rabbitmq.url, procs=PROCS, queues=queue)
        failed = client.submit("test.fail", "boom", queue=queue, priority=1, max_retries=0)
        assert next(iter(client.results([failed], timeout_s=SETTLE_S))).state == "FAILED"
        wait_until(lambda: any(letter.task_id == failed for letter in client.dead_letters()[0]), WAIT_S,
                   message="the failed task in the dead letters")
        worker.stop()
        requeued = client.requeue_dead_letters([failed])[failed]
        assert client.status(requeued).priority == 1
        assert ready_messages(rabbitmq.url, f"qm.tasks.{queue}.p0") == 1
