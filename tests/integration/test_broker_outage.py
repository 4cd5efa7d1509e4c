"""RabbitMQ goes away and comes back: submissions fail fast meanwhile, saying why, and work
again afterwards without restarting anything; no accepted task is lost."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

import qm
import qm.aio
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.client.client import RemoteError
from qm.client.common import error_reason
from qm.reasons import Reason

#: Bound on the server and worker reconnecting after the node is back.
RECONNECT_TIMEOUT_S = 60.0
#: Bound on the tasks accepted around the outage all finishing.
RESULTS_TIMEOUT_S = 120.0
#: Threads submitting while the node shuts down (so some submissions are in flight).
SUBMITTERS = 4
#: Reconnect backoff cap for this test's processes (a real setting: broker.reconnect_max_delay_s).
FAST_RECONNECT = {"QM_BROKER__RECONNECT_MAX_DELAY_S": "1"}
#: "Fail fast": a submit while RabbitMQ is down is answered within this (expected: ms).
FAIL_FAST_S = 2.0


def submit_when_possible(client: qm.Client, queue: str, timeout_s: float) -> str:
    """Retry a submission while the server answers UNAVAILABLE (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit("math", "6 * 7", queue=queue)
        except RemoteError as exc:
            if exc.code is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Submitters:
    """Threads submitting math tasks until each sees its first error."""

    def __init__(self, client: qm.Client, queue: str) -> None:
        self.client = client
        self.queue = queue
        self.accepted: list[str] = []
        self.errors: list[RemoteError] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SUBMITTERS)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            try:
                task_id = self.client.submit("math", "2 + 3", queue=self.queue)
            except RemoteError as exc:
                with self._lock:
                    self.errors.append(exc)
                return
            with self._lock:
                self.accepted.append(task_id)

    def join(self, timeout_s: float) -> None:
        for thread in self._threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), "a submission neither succeeded nor failed"


async def submit_once_aio(address: str, queue: str) -> RemoteError:
    """qm.aio.Client's error for one submit without client-side retries."""
    async with qm.aio.Client(address, submit_retry_s=0) as client:
        with pytest.raises(RemoteError) as refused:
            await client.submit("math", "1 + 4", queue=queue)
    return refused.value


def raw_submit_error(address: str, queue: str) -> grpc.RpcError:
    """A plain gRPC client's error for one submit: what any language sees."""
    with grpc.insecure_channel(address) as channel:
        stub = task_queue_pb2_grpc.TaskQueueStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitTask(task_queue_pb2.SubmitTaskRequest(type="math", payload=b"1", queue=queue), timeout=30)
    return refused.value


def test_submit_fails_fast_while_rabbitmq_is_down_and_works_after_it_returns(own_rabbitmq, launcher):
    queue = launcher.queue(own_rabbitmq.url)
    launcher.forget_queues(own_rabbitmq.url)  # the private node is gone before teardown
    server = launcher.server(own_rabbitmq.url, env=FAST_RECONNECT)
    worker = launcher.worker(own_rabbitmq.url, procs=1, queues=queue, env=FAST_RECONNECT)
    with qm.Client(server.address) as client:
        before = client.submit("math", "1 + 1", queue=queue)
        assert client.result(before, timeout_s=60) == "2"

        busy = Submitters(client, queue)
        own_rabbitmq.stop()
        busy.join(RECONNECT_TIMEOUT_S)
        with qm.Client(server.address, submit_retry_s=0) as impatient:  # no client-side retries
            asked = time.monotonic()
            with pytest.raises(RemoteError) as down:
                impatient.submit("math", "1 + 2", queue=queue)
            answered_s = time.monotonic() - asked

        assert down.value.code is grpc.StatusCode.UNAVAILABLE
        assert answered_s < FAIL_FAST_S, f"UNAVAILABLE took {answered_s:.2f} s while RabbitMQ is down"
        message = str(down.value)
        assert "RabbitMQ" in message and "unreachable" in message, message
        # The server says why by reason code, to both clients and to any gRPC client.
        assert down.value.reason is Reason.BROKER_UNAVAILABLE
        assert asyncio.run(submit_once_aio(server.address, queue)).reason is Reason.BROKER_UNAVAILABLE
        assert error_reason(raw_submit_error(server.address, queue)) == "BROKER_UNAVAILABLE"
        # Submissions cut off mid-flight say it is RabbitMQ, not qm-server, that is gone,
        # after retrying for the client's whole window (same key), as before reason codes.
        for error in busy.errors:
            assert error.code is grpc.StatusCode.UNAVAILABLE, error
            assert error.reason is Reason.BROKER_UNAVAILABLE, error
            assert "RabbitMQ" in str(error) and "cannot reach qm-server" not in str(error), error
            assert f"tried for {client.submit_retry_s:g} s" in str(error), error
        # The server itself still answers what it knows.
        assert client.status(before).state == "SUCCEEDED"

        own_rabbitmq.start()
        after = submit_when_possible(client, queue, RECONNECT_TIMEOUT_S)
        logs = server.logs + "\n" + worker.logs
        assert client.result(after, timeout_s=RECONNECT_TIMEOUT_S) == "42", logs

        # Every task the server accepted (answered with an id) was durable: none is lost.
        final = {status.task_id: status for status in client.watch(busy.accepted, timeout_s=RESULTS_TIMEOUT_S)
                 if status.terminal}
        assert set(final) == set(busy.accepted), logs
        assert {(status.state, status.result) for status in final.values()} <= {("SUCCEEDED", "5")}, logs
        assert server.alive() and worker.alive(), logs


def test_a_worker_started_while_rabbitmq_is_down_waits_for_it_then_works(own_rabbitmq, launcher):
    queue = launcher.queue(own_rabbitmq.url)
    launcher.forget_queues(own_rabbitmq.url)  # the private node is gone before teardown
    server = launcher.server(own_rabbitmq.url, env=FAST_RECONNECT)
    own_rabbitmq.stop()
    worker = launcher.worker(own_rabbitmq.url, procs=1, queues=queue, env=FAST_RECONNECT, wait_ready=False)
    worker.wait_for_line(r"waiting for it before taking tasks", RECONNECT_TIMEOUT_S)
    assert worker.alive(), worker.logs
    own_rabbitmq.start()
    worker.wait_for_line(r"worker \S+ consuming ", RECONNECT_TIMEOUT_S)
    with qm.Client(server.address) as client:
        task_id = submit_when_possible(client, queue, RECONNECT_TIMEOUT_S)
        assert client.result(task_id, timeout_s=RESULTS_TIMEOUT_S) == "42"
