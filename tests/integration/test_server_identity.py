"""Server identity (issue #15, part 2): several qm-servers on one host each follow every
task, a live duplicate is refused at start, and the id is stable across restarts and
across the upgrade from hostname-derived ids.

Real RabbitMQ, real qm-server and qm-worker processes. Most servers here get no
--server-id (`kept_id=True`): they use the id they keep in their data directory, as a
default installation does.
"""
from __future__ import annotations

import re
import socket

import pika
import pytest

import qm
from qm.client.client import RemoteError
from tests.processes import START_TIMEOUT_S, Server, unique, wait_until

#: Bound on a batch of tasks reaching terminal states on a server.
RESULT_TIMEOUT_S = 90.0
#: Tasks submitted through each server in the two-server test (the issue's reproduction used 20).
TASKS_PER_SERVER = 20
#: Exit code of a refused start.
EXIT_REFUSED = 2


def states(server: Server, task_ids: list[str]) -> dict[str, str]:
    """What `qm status` on this server says of each task; UNKNOWN if it has not heard of it."""
    found = {}
    with qm.Client(server.address) as client:
        for task_id in task_ids:
            try:
                found[task_id] = client.status(task_id).state
            except RemoteError as exc:
                if exc.code.name != "NOT_FOUND":
                    raise
                found[task_id] = "UNKNOWN"
    return found


def wait_all_succeeded(server: Server, task_ids: list[str], *logs_of) -> None:
    """Bounded wait until the server shows every task SUCCEEDED; else fail showing the states."""
    def all_succeeded() -> bool:
        return set(states(server, task_ids).values()) == {"SUCCEEDED"}

    try:
        wait_until(all_succeeded, RESULT_TIMEOUT_S, interval_s=0.25, message="every task SUCCEEDED")
    except TimeoutError:
        counts: dict[str, int] = {}
        for state in states(server, task_ids).values():
            counts[state] = counts.get(state, 0) + 1
        logs = "\n".join(process.logs for process in (server, *logs_of))
        pytest.fail(f"{server.name} does not show every task SUCCEEDED within {RESULT_TIMEOUT_S} s: "
                    f"{counts}\n{logs}")


def submit_sums(server: Server, queue: str, count: int) -> dict[str, str]:
    """Submit `count` math tasks through the server; {task id: expected result}."""
    expected = {}
    with qm.Client(server.address) as client:
        for n in range(count):
            expected[client.submit("math", f"{n} + 1000", queue=queue)] = str(n + 1000)
    return expected


def results(server: Server, task_ids) -> dict[str, str]:
    with qm.Client(server.address) as client:
        return {task_id: client.status(task_id).result for task_id in task_ids}


def ready_messages(broker_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def refused(server: Server) -> str:
    """The refused server's exit: code 2, one clear line, no traceback; its stderr."""
    code = server.wait(START_TIMEOUT_S)
    assert code == EXIT_REFUSED, server.logs
    assert "Traceback" not in server.stderr, server.logs
    assert not re.search(r"listening on", server.stderr), server.logs
    return server.stderr


# -- two servers on one host ---------------------------------------------------------------


def test_two_servers_on_one_host_each_show_every_task_terminal(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    first = launcher.server(rabbitmq.url, kept_id=True)
    second = launcher.server(rabbitmq.url, kept_id=True)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)

    hostname = socket.gethostname()
    assert first.server_id != second.server_id
    assert all(server.server_id.startswith(f"server-{hostname}-") for server in (first, second))

    expected = submit_sums(first, queue, TASKS_PER_SERVER)
    expected.update(submit_sums(second, queue, TASKS_PER_SERVER))
    task_ids = list(expected)

    for server in (first, second):
        wait_all_succeeded(server, task_ids, worker)
        assert results(server, task_ids) == expected


# -- a live duplicate is refused -------------------------------------------------------------


def test_a_second_server_on_the_same_data_dir_is_refused_and_the_first_keeps_working(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    first = launcher.server(rabbitmq.url, kept_id=True)

    second = launcher.server(rabbitmq.url, kept_id=True, data_dir=first.data_dir, wait_ready=False)

    stderr = refused(second)
    assert f"another live qm-server already uses the data directory {first.data_dir}" in stderr, stderr
    assert f"pid {first.pid} " in stderr and "--data-dir" in stderr, stderr
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    expected = submit_sums(first, queue, 5)
    wait_all_succeeded(first, list(expected), worker)
    assert results(first, expected) == expected


def test_a_second_server_with_the_same_id_is_refused_and_the_first_keeps_every_event(rabbitmq, launcher,
                                                                                    tmp_path):
    queue = launcher.queue(rabbitmq.url)
    shared_id = unique("server")
    first = launcher.server(rabbitmq.url, server_id=shared_id)

    second = launcher.server(rabbitmq.url, server_id=shared_id, data_dir=tmp_path / "elsewhere",
                             wait_ready=False)

    stderr = refused(second)
    assert (f"qm-server: another live qm-server already uses server id {shared_id} (its queue "
            f"qm.events.{shared_id} has an exclusive consumer); give this server its own --data-dir or a "
            f"different server.id") in stderr, stderr
    # Nothing was split: the first server sees every task of a batch through to the end.
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    expected = submit_sums(first, queue, 10)
    wait_all_succeeded(first, list(expected), worker)
    assert results(first, expected) == expected


# -- the id is stable --------------------------------------------------------------------------


def run_one_then_leave_one_queued(server: Server, queue: str, launcher, broker_url: str) -> tuple[str, str]:
    """Through `server`: a task run to the end, and one left QUEUED (no worker yet). Then
    the server stops, a worker runs the queued task while it is down, and its events wait
    in the server's durable events queue. Returns (finished id, finished while down id)."""
    worker = launcher.worker(broker_url, procs=1, queues=queue)
    with qm.Client(server.address) as client:
        done = client.submit("math", "6 * 7", queue=queue)
        assert client.result(done, timeout_s=RESULT_TIMEOUT_S) == "42", server.logs + worker.logs
        assert worker.stop() == 0, worker.logs
        later = client.submit("math", "2 + 2", queue=queue)
        assert client.status(later).state == "QUEUED"
    assert server.stop() == 0, server.logs

    events = f"qm.events.{server.server_id}"
    worker = launcher.worker(broker_url, procs=1, queues=queue)
    # A run this short is one event: its outcome, carrying its start (worker.running_event_delay_s).
    wait_until(lambda: ready_messages(broker_url, events) >= 1, RESULT_TIMEOUT_S,
               message=f"the outcome event of the task waiting in {events}")
    return done, later


def test_the_id_and_the_store_survive_a_restart(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, kept_id=True)
    server_id = server.server_id
    done, later = run_one_then_leave_one_queued(server, queue, launcher, rabbitmq.url)

    restarted = launcher.server(rabbitmq.url, kept_id=True, data_dir=server.data_dir)

    assert restarted.server_id == server_id
    assert re.search(rf"qm-server {re.escape(server_id)} listening on", restarted.stderr), restarted.logs
    assert results(restarted, [done]) == {done: "42"}  # from the store kept across the restart
    wait_all_succeeded(restarted, [later])  # from the events kept while it was down
    assert results(restarted, [later]) == {later: "4"}


def test_a_data_dir_from_before_ids_were_recorded_keeps_its_hostname_id(rabbitmq, launcher, tmp_path):
    queue = launcher.queue(rabbitmq.url)
    legacy_id = f"server-{socket.gethostname()}"  # what earlier versions derived, recording nothing
    launcher.track_queue(rabbitmq.url, f"qm.dead.{legacy_id}")
    data_dir = tmp_path / "installed-earlier"
    earlier = launcher.server(rabbitmq.url, server_id=legacy_id, data_dir=data_dir)
    done, later = run_one_then_leave_one_queued(earlier, queue, launcher, rabbitmq.url)
    for added_since in ("server-id", "server.lock"):
        (data_dir / added_since).unlink()
    assert {path.name for path in data_dir.iterdir()} <= {f"{legacy_id}.sqlite3", f"{legacy_id}.sqlite3-wal",
                                                          f"{legacy_id}.sqlite3-shm"}

    upgraded = launcher.server(rabbitmq.url, kept_id=True, data_dir=data_dir)

    assert upgraded.server_id == legacy_id
    assert (data_dir / "server-id").read_text() == legacy_id + "\n"
    assert results(upgraded, [done]) == {done: "42"}  # its store
    wait_all_succeeded(upgraded, [later])  # its durable events queue
    assert results(upgraded, [later]) == {later: "4"}
