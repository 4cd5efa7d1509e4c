"""load/bench_floor.py, tiny, on the shared RabbitMQ node: its floor server and floor worker
(no QueueMaster code) must take every task through to its outcome on the stream (each
measure waits for every outcome, so a lost task ends the run, at the results stream's
deadline or the test's bound), report each
measure with the CPU of every process, and leave neither of its queues on the node.
Correctness only; its numbers are for load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import json
import uuid

import pika
import pytest

from tests.load.test_store_bench_smoke import run_script


def queue_exists(broker_url: str, queue: str) -> bool:
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        try:
            connection.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as closed:
            if closed.reply_code == 404:
                return False
            raise
        return True


@pytest.mark.rabbitmq
def test_floor_benchmark_takes_every_task_to_its_outcome_and_cleans_up(rabbitmq, tmp_path):
    out = tmp_path / "floor.json"
    prefix = f"bench-floor-{uuid.uuid4().hex[:8]}"
    result = run_script("bench_floor.py", "--tasks", "20", "--rounds", "1", "--broker-url", rabbitmq.url,
                        "--queue-prefix", prefix, "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    [measured] = json.loads(out.read_text())
    assert 0 < measured["submit_p50_ms"] <= measured["submit_p99_ms"], measured
    assert 0 < measured["round_trip_p50_ms"] <= measured["round_trip_p99_ms"], measured
    assert measured["e2e_tasks_per_s"] > 0, measured
    # the server and the worker both worked for the tasks, and the client's share is counted
    assert measured["server_cpu_ms"] > 0 and measured["worker_cpu_ms"] > 0 and measured["client_cpu_ms"] > 0
    assert not queue_exists(rabbitmq.url, f"{prefix}.tasks") and not queue_exists(rabbitmq.url, f"{prefix}.events")
