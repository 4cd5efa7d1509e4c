"""Waits over more tasks than one results stream may follow (`server.max_stream_ids`).

The server refuses a stream past that many ids, so `watch`, `results` (both clients), the
CLI's `--wait` and a long-lived `qm.Executor` follow them one stream after another. Here
the server's cap is 40, so 100 tasks take three streams (with the server's default cap of
10,000, a wait over 10,001 tasks did fail). A client set to follow more ids a stream than
the server allows (the default 10,000 here) learns the cap from the server's refusal.
"""
from __future__ import annotations

import asyncio
import operator

import pytest

import qm
import qm.aio
from tests.processes import run_qm

CAP = 40
TASKS = 100  # three streams of at most CAP ids
SECRET = "s3cret-for-tests-0123456789abcdefgh"  # executor.secret: at least 32 characters
RESULT_TIMEOUT_S = 120.0


@pytest.fixture
def capped(rabbitmq, launcher):
    """A server that lets one stream follow CAP ids, and a worker, on a queue of this test's own."""
    queue = launcher.queue(rabbitmq.url)
    env = {"QM_SERVER__MAX_STREAM_IDS": str(CAP), "QM_EXECUTOR__SECRET": SECRET}
    server = launcher.server(rabbitmq.url, env=env)
    launcher.worker(rabbitmq.url, procs=2, queues=queue, env={"QM_EXECUTOR__SECRET": SECRET})
    return server, queue


def _submit(client: qm.Client, queue: str) -> list[str]:
    return client.submit_many([("math", f"{i} + 1") for i in range(TASKS)], queue=queue)


def test_results_and_watch_follow_more_tasks_than_one_stream_may(capped):
    server, queue = capped
    with qm.Client(server.address, stream_ids=CAP) as client:
        ids = _submit(client, queue)
        finals = {status.task_id: status for status in client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
        assert sorted(finals) == sorted(ids)
        assert [finals[task_id].result for task_id in ids] == [str(i + 1) for i in range(TASKS)]
        watched = [status for status in client.watch(ids, timeout_s=RESULT_TIMEOUT_S) if status.terminal]
        assert sorted(status.task_id for status in watched) == sorted(ids)


def test_a_client_that_sends_more_ids_than_the_server_allows_learns_the_cap(capped):
    server, queue = capped
    with qm.Client(server.address) as client:  # stream_ids 10,000: over the server's 40
        ids = _submit(client, queue)
        finals = {status.task_id: status.result for status in client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
        assert [finals[task_id] for task_id in ids] == [str(i + 1) for i in range(TASKS)]
        assert client.stream_ids == CAP  # and the next waits start at the server's size
        watched = {status.task_id for status in client.watch(ids, timeout_s=RESULT_TIMEOUT_S) if status.terminal}
        assert watched == set(ids)


def test_the_aio_client_follows_more_tasks_than_one_stream_may(capped):
    server, queue = capped

    async def main() -> dict[str, str]:
        async with qm.aio.Client(server.address) as client:  # learns the cap from the refusal
            ids = await client.submit_many([("math", f"{i} * 2") for i in range(TASKS)], queue=queue)
            finals = {status.task_id: status.result async for status in client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
            assert client.stream_ids == CAP
            return {task_id: finals[task_id] for task_id in ids}

    results = asyncio.run(main())
    assert list(results.values()) == [str(i * 2) for i in range(TASKS)]


def test_an_executor_keeps_working_past_the_ids_one_stream_may_follow(capped):
    server, queue = capped
    with qm.Executor(server.address, secret=SECRET, queue=queue) as executor:  # learns the cap
        futures = [executor.submit(operator.add, i, 1) for i in range(TASKS)]
        assert [future.result(RESULT_TIMEOUT_S) for future in futures] == [i + 1 for i in range(TASKS)]
        assert list(executor.map(operator.mul, range(TASKS), [3] * TASKS, timeout=RESULT_TIMEOUT_S)) == [
            i * 3 for i in range(TASKS)
        ]


def test_the_cli_waits_for_more_lines_than_one_stream_may_follow(capped):
    server, queue = capped
    lines = "\n".join(f"{i} + 100" for i in range(TASKS)) + "\n"
    result = run_qm("--server", server.address, "submit", "-T", "math", "--queue", queue, "--from-file", "-",
                    "--wait", input=lines)  # the client's default stream_ids: the cap is learnt
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(i + 100) for i in range(TASKS)]
