"""Secrets (issue 12, item 4), for real: a replayed or expired signed payload is refused,
key ids rotate, secrets never reach task processes' environment, a short secret stops the
start, the data directory is the owner's only."""
from __future__ import annotations

import os
import stat

import cloudpickle
import grpc
import pytest

import qm
from qm._proto.qm.v1 import task_queue_pb2
from qm.security.signing import Keyring
from tests.security.support import (
    assert_answers_normal_client,
    attack,
    queued_messages,
    refused,
    stored_tasks,
    stub,
)

OLD_SECRET = "old-secret-of-the-tests-0123456789abcdef"
NEW_SECRET = "new-secret-of-the-tests-fedcba9876543210"
RESULT_TIMEOUT_S = 120.0


def _python_request(payload: bytes, queue: str, key: str) -> task_queue_pb2.SubmitTaskRequest:
    return task_queue_pb2.SubmitTaskRequest(type="python", payload=payload, queue=queue, idempotency_key=key)


def _call_payload(keys: Keyring, ttl_s: float = 300.0) -> bytes:
    return keys.sign(cloudpickle.dumps((sum, ([1, 2, 3],), {})), ttl_s)


def test_a_replayed_or_expired_signed_payload_is_refused_and_nothing_more_is_stored(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)  # no worker: what was accepted stays in the queue to be counted
    server = launcher.server(rabbitmq.url, env={"QM_EXECUTOR__SECRET": NEW_SECRET})
    keys = Keyring("1", {"1": NEW_SECRET})
    captured = _call_payload(keys)
    with stub(server.address) as client:
        first = client.SubmitTask(_python_request(captured, queue, "first"), timeout=30)
        # The client's own retry (same idempotency key) is the same task, not a refusal.
        again = client.SubmitTask(_python_request(captured, queue, "first"), timeout=30)
        assert again.task_id == first.task_id

        def replay():
            client.SubmitTask(_python_request(captured, queue, os.urandom(8).hex()), timeout=10)

        with attack(replay):
            assert_answers_normal_client(server.address)
        replayed = refused(replay)
        expired = refused(lambda: client.SubmitTask(
            _python_request(_call_payload(keys, ttl_s=-1), queue, "late"), timeout=10))
    assert replayed.code() is grpc.StatusCode.INVALID_ARGUMENT and "replay" in replayed.details()
    assert expired.code() is grpc.StatusCode.INVALID_ARGUMENT and "expired" in expired.details()
    assert stored_tasks(server.data_dir) == 1 and queued_messages(rabbitmq.url, queue) == 1
    assert_answers_normal_client(server.address)

    # The data directory and the files in it are the owner's only.
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    files = [path for path in server.data_dir.iterdir() if path.is_file()]
    assert files and {path.name: stat.S_IMODE(path.stat().st_mode) & 0o077 for path in files} == \
        {path.name: 0 for path in files}


def environment_probe():
    """A call that, run in a worker child, returns every QM_ variable it sees and whether a
    secret is anywhere in its environment (os.environ and the one it was exec'd with).
    Made in a function so that cloudpickle sends it by value (the worker cannot import
    this test module)."""
    def probe():
        import os as child_os

        with open("/proc/self/environ", "rb") as stream:
            initial = stream.read().decode(errors="replace")
        values = "\n".join(child_os.environ.values()) + initial
        names = sorted(name for name in child_os.environ if name.startswith("QM_"))
        return names, any(marker in values for marker in ("secret-of-the-tests", "guest:guest", "QM_EXECUTOR"))
    return probe


@pytest.fixture
def rotated(rabbitmq, launcher):
    """Server and worker signing with key id 2 and still accepting key id 1; the secrets come
    from the environment, as many deployments pass them."""
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_EXECUTOR__SECRET": NEW_SECRET, "QM_EXECUTOR__KEY_ID": "2",
           "QM_EXECUTOR__PREVIOUS_SECRETS": f"1:{OLD_SECRET}", "QM_BROKER__URL": rabbitmq.url}
    server = launcher.server(rabbitmq.url, env=env)
    launcher.worker(rabbitmq.url, procs=1, queues=queue, env=env)
    return server, queue


def test_old_and_new_key_ids_are_accepted_an_unknown_one_is_refused(rotated):
    server, queue = rotated
    for key_id, secret in (("1", OLD_SECRET), ("2", NEW_SECRET)):
        with qm.Executor(server.address, secret=secret, key_id=key_id, queue=queue) as executor:
            assert executor.submit(sum, [1, 2, 3]).result(RESULT_TIMEOUT_S) == 6
    with qm.Executor(server.address, secret=NEW_SECRET, key_id="3", queue=queue) as executor:
        with pytest.raises(Exception) as unknown:  # refused at submit: the error is on the future
            executor.submit(sum, [1]).result(RESULT_TIMEOUT_S)
    assert "key id '3'" in str(unknown.value)


def test_secrets_never_reach_the_environment_of_task_processes(rotated):
    server, queue = rotated
    with qm.Executor(server.address, secret=NEW_SECRET, key_id="2", queue=queue) as executor:
        names, secret_seen = executor.submit(environment_probe()).result(RESULT_TIMEOUT_S)
    assert not [name for name in names if name.startswith(("QM_EXECUTOR__", "QM_BROKER__URL"))], names
    assert not secret_seen


def test_a_short_executor_secret_stops_the_start_naming_the_key(rabbitmq, launcher):
    server = launcher.server(rabbitmq.url, env={"QM_EXECUTOR__SECRET": "too-short"}, wait_ready=False)
    assert server.wait(60) == 2
    assert "executor.secret" in server.stderr and "at least 32 characters" in server.stderr


def test_a_submit_retried_under_its_key_after_a_broker_outage_is_not_taken_for_a_replay(own_rabbitmq, launcher):
    """The server validates (and records the nonce) before it publishes: while RabbitMQ is
    down the submit is UNAVAILABLE, and the client's retry under the same idempotency key
    must be accepted once RabbitMQ is back; the same payload under another key is a replay."""
    launcher.forget_queues(own_rabbitmq.url)  # the private node is gone before teardown
    queue = launcher.queue(own_rabbitmq.url)
    server = launcher.server(own_rabbitmq.url, env={"QM_EXECUTOR__SECRET": NEW_SECRET,
                                                    "QM_BROKER__RECONNECT_MAX_DELAY_S": "1"})
    payload = _call_payload(Keyring("1", {"1": NEW_SECRET}))
    with stub(server.address) as client:
        own_rabbitmq.stop()
        down = refused(lambda: client.SubmitTask(_python_request(payload, queue, "retried"), timeout=30))
        assert down.code() is grpc.StatusCode.UNAVAILABLE, down
        mark = server.line_count()
        own_rabbitmq.start()
        server.wait_for_line(r"connected to RabbitMQ", 120, start=mark)
        accepted = client.SubmitTask(_python_request(payload, queue, "retried"), timeout=30)
        assert accepted.task_id
        replay = refused(lambda: client.SubmitTask(_python_request(payload, queue, "another"), timeout=30))
    assert replay.code() is grpc.StatusCode.INVALID_ARGUMENT and "replay" in replay.details()
