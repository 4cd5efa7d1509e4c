"""The separately installed example plugin (plugins/qm-examples) through the full system."""
from __future__ import annotations

import hashlib

import grpc
import pytest

from qm.client.client import RemoteError

RESULT_TIMEOUT_S = 120.0


def test_example_task_types_run_end_to_end(stack):
    client = stack.client
    primes = client.submit("examples.primes", {"below": 1_000_000}, queue=stack.queue)
    chain = client.submit("examples.hash_chain", "3:seed", queue=stack.queue)

    assert client.result(primes, timeout_s=RESULT_TIMEOUT_S) == {"below": 1_000_000, "count": 78498}
    expected = hashlib.sha256(hashlib.sha256(hashlib.sha256(b"seed").digest()).digest()).hexdigest()
    assert client.result(chain, timeout_s=RESULT_TIMEOUT_S) == expected


def test_the_plugins_validator_runs_in_the_server_at_submit(stack):
    with pytest.raises(RemoteError) as error:
        stack.client.submit("examples.primes", {"below": 1}, queue=stack.queue)
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "payload.below" in str(error.value)


def test_the_plugins_limits_are_the_tasks_defaults(stack):
    task_id = stack.client.submit("examples.primes", {"below": 100}, queue=stack.queue)
    stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S)

    status = stack.client.status(task_id)
    assert (status.timeout_s, status.memory_limit_mb) == (60.0, 512)
