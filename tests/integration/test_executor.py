"""qm.Executor end to end: pickled callables through a real server, RabbitMQ and worker."""
from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

import qm
from qm.client.client import RemoteError
from qm.errors import TaskError
from qm.tasks.python import sign

SECRET = "s3cret-for-tests"
RESULT_TIMEOUT_S = 120.0


@pytest.fixture
def cluster(rabbitmq, launcher):
    """A server and a worker sharing the executor secret, on a queue of this test's own."""
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_EXECUTOR__SECRET": SECRET}
    server = launcher.server(rabbitmq.url, env=env)
    launcher.worker(rabbitmq.url, procs=2, queues=queue, env=env)
    return server, queue


def test_map_over_200_calls_returns_every_result_in_order(cluster):
    server, queue = cluster
    offset = 7  # a closure: the function is pickled by value, not by reference

    def shifted_square(x):
        return x * x + offset

    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        results = list(executor.map(shifted_square, range(200), timeout=RESULT_TIMEOUT_S))

    assert results == [x * x + offset for x in range(200)]


def test_an_exception_raised_by_the_call_reaches_its_future(cluster):
    server, queue = cluster

    def divide(a, b):
        return a / b

    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        future = executor.submit(divide, 1, 0)
        with pytest.raises(ZeroDivisionError):
            future.result(RESULT_TIMEOUT_S)
        assert executor.submit(divide, 6, 3).result(RESULT_TIMEOUT_S) == 2.0


def test_a_call_killed_at_its_time_limit_surfaces_as_timeout_error(cluster):
    server, queue = cluster

    def forever():
        while True:
            time.sleep(0.1)

    with qm.Executor(server.address, secret=SECRET, queue=queue, timeout_s=1.0) as executor:
        with pytest.raises(TimeoutError):
            executor.submit(forever).result(RESULT_TIMEOUT_S)


def test_unsigned_or_wrongly_signed_payloads_are_rejected_at_submit(cluster):
    server, queue = cluster
    with qm.Client(server.address, submit_retry_s=0) as client:
        for payload in (b"not signed", sign("another-secret", b"anything")):
            with pytest.raises(RemoteError) as error:
                client.submit("python", payload, queue=queue)
            assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "payload" in str(error.value)


def test_a_worker_with_another_secret_refuses_to_unpickle(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env={"QM_EXECUTOR__SECRET": SECRET})
    launcher.worker(rabbitmq.url, procs=1, queues=queue, env={"QM_EXECUTOR__SECRET": "not-the-same"})

    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        with pytest.raises(TaskError) as error:
            executor.submit(sum, [1, 2]).result(RESULT_TIMEOUT_S)

    assert error.value.state == "FAILED"
    assert "signature does not match" in error.value.error


def test_without_a_secret_the_python_type_is_refused(rabbitmq, launcher):
    server = launcher.server(rabbitmq.url)
    with qm.Client(server.address, submit_retry_s=0) as client:
        with pytest.raises(RemoteError) as error:
            client.submit("python", sign(SECRET, b"x"))
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "executor.secret" in str(error.value)


def test_results_arrive_as_futures_complete_not_all_at_the_end(cluster):
    server, queue = cluster

    def pause(seconds):
        time.sleep(seconds)
        return seconds

    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        slow, fast = executor.submit(pause, 3), executor.submit(pause, 0.1)
        done, _ = concurrent.futures.wait([slow, fast], timeout=RESULT_TIMEOUT_S,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        assert fast in done and fast.result() == 0.1
        assert slow.result(RESULT_TIMEOUT_S) == 3
