"""The server's reconciler brings back a task whose message RabbitMQ lost: here a retry
waiting in its delay queue is purged by hand (what a dead-lettering RabbitMQ dropping it
looks like), and the task still ends SUCCEEDED, from the copy the server keeps."""
from __future__ import annotations

import pika

import qm
from qm.broker import topology
from tests.processes import wait_until

#: Short reconciler settings for the test (real config keys).
FAST_RECONCILER = {"QM_SERVER__RECONCILE_INTERVAL_S": "0.5", "QM_SERVER__RECONCILE_AFTER_S": "2"}
STATE_TIMEOUT_S = 60.0
#: The retry delay: its tier (10 s) holds the message long enough to purge it on a loaded machine.
BACKOFF_S = 10


def purge(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_purge(queue).method.message_count
    finally:
        connection.close()


def test_a_retry_lost_from_its_delay_queue_is_published_again_and_succeeds(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env=FAST_RECONCILER)
    launcher.worker(rabbitmq.url, procs=1, queues=queue)
    counter = tmp_path / "runs"
    with qm.Client(server.address) as client:
        task_id = client.submit("test.flaky", f"{counter}:1", queue=queue, max_retries=2,
                                retry_backoff_s=BACKOFF_S, retry_jitter=False)
        wait_until(lambda: client.status(task_id).state == "RETRYING", STATE_TIMEOUT_S,
                   message="the first attempt failing into a retry")
        assert purge(rabbitmq.url, topology.delay_tier_name(BACKOFF_S)) >= 1  # the retry is gone

        assert client.result(task_id, timeout_s=STATE_TIMEOUT_S) == "succeeded on run 2"
        status = client.status(task_id)
        assert (status.state, status.attempts) == ("SUCCEEDED", 2)
    assert f"reconciler: task {task_id}" in server.stderr, server.logs
