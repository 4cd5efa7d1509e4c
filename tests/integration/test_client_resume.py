"""Clients that ride out a server restart, and fail over between servers (issue 17, part 1).

A server is killed with SIGKILL and started again on the same address and data directory
(a crash, a deploy) while a client waits: result(), watch() over 100 tasks. And a client
given two addresses ("A,B") keeps working when A is dead, or dies under it. The servers
here have stores of their own (a shared store comes with PostgreSQL): B knows a task
submitted through A only from its events, so the failover of a wait is tested on a task
that has started.
"""
from __future__ import annotations

import asyncio
import collections
import threading

import pytest

import qm
import qm.aio
from qm.client.client import RemoteError, TaskStatus
from tests.processes import wait_until

pytestmark = pytest.mark.timeout(300)

#: Bound on any wait for tasks to finish (restarts included).
RESULT_TIMEOUT_S = 120.0
#: Bound on a task reaching RUNNING.
START_TIMEOUT_S = 60.0
WATCHED = 100


def restart(launcher, rabbitmq, server):
    """kill -9 the server, start it again on the same port, id and data dir."""
    server.kill()
    restarted = launcher.server(rabbitmq.url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])
    assert restarted.port == server.port and restarted.data_dir == server.data_dir
    return restarted


def logs(*processes) -> str:
    return "\n".join(process.logs[-4000:] for process in processes)


def test_result_rides_out_a_kill_9_and_restart_of_its_server(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    outcome: dict[str, object] = {}
    with qm.Client(server.address) as client:
        task_id = client.submit("test.sleep", "6", queue=queue)

        def wait() -> None:
            try:
                outcome["value"] = client.result(task_id, timeout_s=RESULT_TIMEOUT_S)
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_until(lambda: client.status(task_id).state == "RUNNING", START_TIMEOUT_S, message="task running")
        restarted = restart(launcher, rabbitmq, server)
        assert waiter.is_alive(), f"result() returned while its server was being restarted: {outcome}"
        waiter.join(RESULT_TIMEOUT_S)

    assert not waiter.is_alive(), "result() did not return after the server came back"
    assert outcome == {"value": "6"}, f"{outcome}\n{logs(server, restarted, worker)}"


def test_the_asyncio_clients_result_rides_out_a_kill_9_and_restart(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    restarted = []

    async def body():
        async with qm.aio.Client(server.address) as client:
            task_id = await client.submit("test.sleep", "4", queue=queue)
            waiting = asyncio.create_task(client.result(task_id, timeout_s=RESULT_TIMEOUT_S))
            while (await client.status(task_id)).state != "RUNNING":
                await asyncio.sleep(0.1)  # bounded by the wait_for below
            restarted.append(await asyncio.to_thread(restart, launcher, rabbitmq, server))
            assert not waiting.done(), "result() returned while its server was being restarted"
            return await waiting

    value = asyncio.run(asyncio.wait_for(body(), RESULT_TIMEOUT_S * 2))
    assert value == "4", logs(server, *restarted, worker)


def test_watch_over_100_tasks_rides_out_a_kill_9_and_restart(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    processes = [server, worker]
    updates: list[TaskStatus] = []
    open_at_kill = None
    with qm.Client(server.address) as client:
        ids = client.submit_many([("test.sleep", "0.1")] * WATCHED, queue=queue)
        for status in client.watch(ids, timeout_s=RESULT_TIMEOUT_S):
            updates.append(status)
            finished = sum(1 for update in updates if update.terminal)
            if open_at_kill is None and finished >= 20:  # the stream is open, most tasks are not done
                open_at_kill = WATCHED - finished
                processes.append(restart(launcher, rabbitmq, server))

    assert open_at_kill, "the server was never killed during the watch"
    terminal = collections.Counter(update.task_id for update in updates if update.terminal)
    assert terminal == dict.fromkeys(ids, 1), f"terminal updates per task\n{logs(*processes)}"
    assert all(update.state == "SUCCEEDED" for update in updates if update.terminal)
    keys = [(update.task_id, update.state, update.attempts, update.updated_at) for update in updates]
    assert len(keys) == len(set(keys)), "a state was delivered twice"
    last_of = {update.task_id: update for update in updates}
    assert all(last.terminal for last in last_of.values()), "a state came after a task's final one"
    print(f"\n[resume] watch over {WATCHED} tasks: {open_at_kill} open at the kill, {len(updates)} updates")


def test_a_client_of_two_servers_works_through_the_second_when_the_first_is_dead(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    dead = launcher.server(rabbitmq.url)
    alive = launcher.server(rabbitmq.url)
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    dead.kill()
    with qm.Client(alive.address) as only_b:
        earlier = only_b.submit("test.echo", "through B", queue=queue)

    with qm.Client(f"{dead.address},{alive.address}") as client:
        assert client.result(earlier, timeout_s=RESULT_TIMEOUT_S) == "through B"  # a wait fails over
        assert client.status(earlier).state == "SUCCEEDED"                         # and every call
        task_id = client.submit("math", "6 * 7", queue=queue)
        assert client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "42"
        assert client.submit_many([("math", "1 + 1"), ("math", "2 + 2")], queue=queue)
        assert "math" in {item.name for item in client.task_types()[0]}


def test_a_wait_fails_over_when_the_server_it_talks_to_dies(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    first = launcher.server(rabbitmq.url)
    second = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    updates = []
    with qm.Client(f"{first.address},{second.address}") as client, qm.Client(second.address) as only_second:
        task_id = client.submit("test.sleep", "4", queue=queue)  # through the first server
        # The second one learns the task from its events (stores are per server).
        wait_until(lambda: _state(only_second, task_id) == _state(client, task_id) == "RUNNING",
                   START_TIMEOUT_S, message="both servers know the task as RUNNING")
        for status in client.watch([task_id], timeout_s=RESULT_TIMEOUT_S):
            updates.append(status)
            if len(updates) == 1:
                first.kill()

    assert [update.state for update in updates] == ["RUNNING", "SUCCEEDED"], \
        f"{updates}\n{logs(first, second, worker)}"
    assert updates[-1].result == "4"


def _state(client: qm.Client, task_id: str) -> str:
    try:
        return client.status(task_id).state
    except RemoteError:
        return "unknown"
