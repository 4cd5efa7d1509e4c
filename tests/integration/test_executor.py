"""qm.Executor end to end: pickled callables through a real server, RabbitMQ and worker."""
from __future__ import annotations

import concurrent.futures
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time

import grpc
import pika
import pytest

import qm
from qm.broker import topology
from qm.client.client import RemoteError
from qm.errors import TaskError
from qm.messages import TaskEvent
from qm.states import TaskState
from qm.tasks.python import SignatureError, sign
from qm.testing.rabbitmq import free_port
from tests.processes import GATE_BOUND_S, clean_env, wait_until, worker_status
from tests.time_limits import assert_ended_at_limit

SECRET = "s3cret-for-tests-0123456789abcdefgh"  # executor.secret: at least 32 characters
RESULT_TIMEOUT_S = 120.0
#: Bound on a call killed at a 1 s limit reaching its future (queueing and events included).
KILLED_CALL_TIMEOUT_S = 30.0


def gate_waiter():
    """A call that returns only once `path` exists (the test opens it), at most bound_s.
    Made in a function so that cloudpickle sends it by value (this test module cannot be
    imported on the worker)."""
    def wait_for_gate(path: str, bound_s: float) -> str:
        deadline = time.monotonic() + bound_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gate {path} not opened within {bound_s} s")
            time.sleep(0.01)
        return "released"
    return wait_for_gate


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
    # Submitted as groups of at most GROUP_ITEMS calls, each visible as `qm status GROUP_ID`.
    [group_id] = executor.map_group_ids
    with qm.Client(server.address) as client:
        group = client.group_status(group_id)
    assert (group.members, group.counts, group.callback_task_id) == (200, {"SUCCEEDED": 200}, "")


def test_calls_submitted_in_a_with_block_all_have_their_results_when_it_ends(cluster):
    server, queue = cluster
    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        futures = [executor.submit(pow, i, 2) for i in range(60)]  # back to back: they go out together
    # Leaving the block is shutdown(wait=True): the outbox sent, every call finished.
    assert all(future.done() for future in futures)
    assert [future.result(0) for future in futures] == [i * i for i in range(60)]


def test_a_script_that_never_shuts_its_executor_down_still_runs_the_calls_it_made(cluster, tmp_path):
    """As concurrent.futures executors run their pending work at exit: the calls still in
    the outbox when the script ends are sent before the interpreter goes."""
    server, queue = cluster
    marks = tmp_path / "marks"
    marks.mkdir()
    script = textwrap.dedent(f"""
        import pathlib
        import qm

        def mark(n):
            pathlib.Path({str(marks)!r}, str(n)).touch()
            return n

        executor = qm.Executor({server.address!r}, secret={SECRET!r}, queue={queue!r})
        for n in range(20):
            executor.submit(mark, n)
        print("submitted", flush=True)  # and exits at once: no result(), no shutdown()
    """)
    result = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True,
                            timeout=RESULT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(list(marks.iterdir())) == 20, RESULT_TIMEOUT_S, message="all 20 calls ran")
    assert sorted(int(path.name) for path in marks.iterdir()) == list(range(20))


def test_a_call_that_outlives_the_servers_stream_lifetime_still_gets_its_result(rabbitmq, launcher):
    """The server ends a status stream after server.max_stream_s (an hour by default); the
    executor opens it again with the calls still open, as the clients' waits do."""
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_EXECUTOR__SECRET": SECRET}
    server = launcher.server(rabbitmq.url, env={**env, "QM_SERVER__MAX_STREAM_S": "2"})
    launcher.worker(rabbitmq.url, procs=2, queues=queue, env=env)
    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        slow = executor.submit(time.sleep, 5)  # over two of the stream's lifetimes
        quick = [executor.submit(pow, 3, n) for n in range(5)]
        assert [future.result(RESULT_TIMEOUT_S) for future in quick] == [3**n for n in range(5)]
        assert slow.result(RESULT_TIMEOUT_S) is None
        later = executor.submit(pow, 2, 5)  # on the stream opened again
        assert later.result(RESULT_TIMEOUT_S) == 32


def test_a_future_rides_out_a_kill_9_and_restart_of_its_server(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_EXECUTOR__SECRET": SECRET}
    server = launcher.server(rabbitmq.url, env=env)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue, env=env)
    gate = tmp_path / "gate"
    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        try:
            future = executor.submit(gate_waiter(), str(gate), GATE_BOUND_S)
            wait_until(lambda: any(child.type == "python" for child in worker_status(worker).children),
                       RESULT_TIMEOUT_S, message="the call running")
            server.kill()  # a crash or a deploy: the same address, id and data dir again
            restarted = launcher.server(rabbitmq.url, server_id=server.server_id, env=env,
                                        extra_args=["--listen", f"127.0.0.1:{server.port}"])
            assert restarted.port == server.port
        finally:
            gate.touch()
        assert future.result(RESULT_TIMEOUT_S) == "released"
        assert executor.submit(pow, 2, 3).result(RESULT_TIMEOUT_S) == 8  # and it goes on


def test_calls_to_a_server_nobody_runs_fail_their_futures_naming_the_address():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with qm.Executor(address, secret=SECRET) as executor:
        futures = [executor.submit(pow, 2, n) for n in range(600)]  # more than one SubmitTasks call
        errors = [future.exception(RESULT_TIMEOUT_S) for future in futures]
    assert all(isinstance(error, RemoteError) for error in errors), {type(error) for error in errors}
    assert {error.code for error in errors} == {grpc.StatusCode.UNAVAILABLE}
    assert f"cannot reach qm-server at {address}" in str(errors[-1])


def test_a_call_the_server_refuses_fails_its_own_future_and_its_neighbours_run(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_EXECUTOR__SECRET": SECRET}
    server = launcher.server(rabbitmq.url, env={**env, "QM_SERVER__MAX_PAYLOAD_BYTES": "20000"})
    launcher.worker(rabbitmq.url, procs=2, queues=queue, env=env)
    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        before = executor.submit(len, b"x" * 10)
        refused = executor.submit(len, b"x" * 50_000)  # its payload is over the server's 20,000 bytes
        after = executor.submit(len, b"x" * 30)
        error = refused.exception(RESULT_TIMEOUT_S)
        assert isinstance(error, RemoteError), error
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "server.max_payload_bytes" in str(error)
        assert (before.result(RESULT_TIMEOUT_S), after.result(RESULT_TIMEOUT_S)) == (10, 30)


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
        future = executor.submit(forever)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as error:
            future.result(KILLED_CALL_TIMEOUT_S)
        waited_s = time.monotonic() - started

    # concurrent.futures.TimeoutError is the built-in TimeoutError: result() giving up on a
    # future that never resolves raises it too. This one must be the call's own.
    assert future.done() and future.exception() is error.value, \
        f"the future never resolved: result() gave up after {waited_s:.1f} s"
    named = re.match(r"task (?P<id>\S+): .*time limit", str(error.value))
    assert named, f"the error does not name the task and its time limit: {error.value}"
    with qm.Client(server.address) as client:
        status = client.status(named["id"])
    assert status.state == "TIMED_OUT", status
    assert_ended_at_limit(status, 1.0)


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
    launcher.worker(rabbitmq.url, procs=1, queues=queue,
                    env={"QM_EXECUTOR__SECRET": "not-the-same-secret-0123456789abcdefgh"})

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


def test_results_arrive_as_futures_complete_not_all_at_the_end(cluster, tmp_path):
    """The slow call returns only once the test has seen the fast call's result: results
    delivered all at the end would leave the fast future pending until the wait gives up."""
    server, queue = cluster
    gate = tmp_path / "release-slow"

    def quick(value):
        return value

    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        try:
            slow = executor.submit(gate_waiter(), str(gate), GATE_BOUND_S)
            fast = executor.submit(quick, 0.1)
            done, _ = concurrent.futures.wait([slow, fast], timeout=RESULT_TIMEOUT_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            assert fast in done and fast.result() == 0.1
            assert not slow.done(), "the slow call finished before its gate opened"
        finally:
            gate.touch()
        assert slow.result(RESULT_TIMEOUT_S) == "released"


class LeavesAMark:
    """Unpickling this creates a file: what a forged result could do to a client that
    unpickled it without checking the signature."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_result_not_signed_with_the_secret_is_refused_before_unpickling(rabbitmq, launcher, tmp_path):
    """Whoever can publish to RabbitMQ can forge a task's outcome event. The client checks
    the result's signature before unpickling: a forged SUCCEEDED fails the future with
    SignatureError, and the forged pickle never runs in the client."""
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_EXECUTOR__SECRET": SECRET}
    server = launcher.server(rabbitmq.url, env=env)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue, env=env)
    gate, mark = tmp_path / "release", tmp_path / "unpickled"

    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:
        try:
            future = executor.submit(gate_waiter(), str(gate), GATE_BOUND_S)
            task_id = wait_until(lambda: next((child.task_id for child in worker_status(worker).children
                                               if child.type == "python"), None),
                                 RESULT_TIMEOUT_S, message="the call running")
            forged = sign("not-the-secret", pickle.dumps(("ok", LeavesAMark(str(mark)))))
            event = TaskEvent(task_id, "python", queue, 1, TaskState.SUCCEEDED, worker.worker_id, forged)
            with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
                headers = {"qm-task-id": task_id, "qm-state": "SUCCEEDED"}
                connection.channel().basic_publish(topology.EVENTS_EXCHANGE, "", event.encode(),
                                                   pika.BasicProperties(headers=headers, delivery_mode=2))

            with pytest.raises(SignatureError) as refused:
                future.result(RESULT_TIMEOUT_S)
        finally:
            gate.touch()

    assert "signature does not match" in str(refused.value), refused.value
    assert not mark.exists(), "the client unpickled a result that was not signed with its secret"
