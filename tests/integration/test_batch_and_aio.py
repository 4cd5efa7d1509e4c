"""Batch and async submission the way a user with many tasks works (issue 9, item 4):
submit_many over the SubmitTasks RPC, results(ids) as each finishes, and qm.aio.Client
with the methods of qm.Client. Idempotency keys reused for another request are refused
(issue 17, part 2). Real qm-server, qm-worker and RabbitMQ."""
from __future__ import annotations

import asyncio
import concurrent.futures
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import qm
import qm.aio
from qm.client.client import RemoteError
from qm.errors import BatchError, TaskError
from qm.testing.rabbitmq import free_port
from tests.processes import run_qm, wait_until

#: Bound on tasks finishing.
RESULT_TIMEOUT_S = 90.0


def test_submit_many_returns_the_ids_in_order_and_each_task_runs(stack):
    payloads = [f"{i} * 3" for i in range(40)]

    ids = stack.client.submit_many([("math", payload) for payload in payloads], queue=stack.queue)

    assert len(ids) == 40 and len(set(ids)) == 40
    finals = {status.task_id: status for status in stack.client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
    assert [finals[task_id].result for task_id in ids] == [str(i * 3) for i in range(40)]


def test_a_refused_item_names_itself_and_the_accepted_ones_run(stack):
    items = [("test.echo", "first"), ("math", "1 +"), ("no.such.type", "x"), ("test.echo", "last")]

    with pytest.raises(BatchError) as caught:
        stack.client.submit_many(items, queue=stack.queue)

    error = caught.value
    assert [(item.index, item.code) for item in error.refused] == [(1, "INVALID_ARGUMENT"),
                                                                    (2, "INVALID_ARGUMENT")]
    assert "item 1 (math)" in str(error) and "item 2 (no.such.type)" in str(error)
    assert error.task_ids[1] is None and error.task_ids[2] is None and len(error.accepted_ids) == 2
    assert [stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S) for task_id in error.accepted_ids] == \
        ["first", "last"]


def test_a_batch_sent_again_with_its_key_is_the_same_tasks(stack):
    key = f"batch-{uuid.uuid4().hex}"
    items = [("test.echo", f"item {i}") for i in range(5)]

    first = stack.client.submit_many(items, queue=stack.queue, idempotency_key=key)
    again = stack.client.submit_many(items, queue=stack.queue, idempotency_key=key)

    assert again == first
    assert stack.client.result(first[4], timeout_s=RESULT_TIMEOUT_S) == "item 4"


def test_results_yields_a_fast_task_before_a_slow_one_finishes(stack):
    slow = stack.client.submit("test.sleep", "6", queue=stack.queue)
    fast = stack.client.submit("test.echo", "fast", queue=stack.queue)

    finished = stack.client.results([slow, fast], timeout_s=RESULT_TIMEOUT_S)
    first = next(finished)
    slow_then = stack.client.status(slow).state
    second = next(finished)

    assert (first.task_id, first.state, first.result) == (fast, "SUCCEEDED", "fast")
    assert slow_then in ("QUEUED", "RUNNING"), "the fast result came only after the slow task ended"
    assert (second.task_id, second.result) == (slow, "6")
    assert next(finished, None) is None


def test_a_stream_following_hundreds_of_tasks_gives_each_its_own_final_status_once(stack):
    ids = stack.client.submit_many([("math", f"{i} + 1") for i in range(250)], queue=stack.queue)
    done = {status.task_id: status for status in stack.client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
    assert [done[task_id].result for task_id in ids] == [str(i + 1) for i in range(250)]

    # All finished now: the server reads them in look-ups of many ids, not one each.
    asked = ids[::-1] + ids[:3]  # another order, and ids sent twice
    again = list(stack.client.results(asked, timeout_s=RESULT_TIMEOUT_S))

    assert sorted(status.task_id for status in again) == sorted(ids)
    assert {status.task_id: status.result for status in again} == {task_id: done[task_id].result for task_id in ids}


def test_following_an_unknown_id_among_known_ones_names_it(stack):
    known = stack.client.submit_many([("math", f"{i} * 2") for i in range(150)], queue=stack.queue)

    with pytest.raises(RemoteError) as caught:
        list(stack.client.results(known[:120] + ["no-such-task"] + known[120:], timeout_s=RESULT_TIMEOUT_S))

    assert caught.value.code is grpc.StatusCode.NOT_FOUND and "no-such-task" in str(caught.value)


# -- idempotency keys --------------------------------------------------------------------

def test_a_key_reused_for_another_request_is_refused_naming_it(stack):
    key = f"reused-{uuid.uuid4().hex}"
    first = stack.client.submit("math", "1 + 1", queue=stack.queue, idempotency_key=key)

    with pytest.raises(RemoteError) as caught:
        stack.client.submit("math", "2 + 2", queue=stack.queue, idempotency_key=key)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert key in str(caught.value) and "another request" in str(caught.value) and first in str(caught.value)
    assert stack.client.submit("math", "1 + 1", queue=stack.queue, idempotency_key=key) == first
    assert stack.client.result(first, timeout_s=RESULT_TIMEOUT_S) == "2"

    refused = run_qm("submit", "-T", "math", "-P", "3 + 3", "--queue", stack.queue, "--idempotency-key", key,
                     server=stack.server.address)
    assert refused.returncode == 1 and "another request" in refused.stderr and refused.stdout == "", refused


def test_a_key_is_free_again_once_retention_forgot_its_task(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env={"QM_SERVER__RETENTION_S": "1"})
    launcher.worker(rabbitmq.url, procs=1, queues=queue)
    key = f"short-lived-{uuid.uuid4().hex}"
    with qm.Client(server.address) as client:
        first = client.submit("math", "1 + 1", queue=queue, idempotency_key=key)
        assert client.result(first, timeout_s=RESULT_TIMEOUT_S) == "2"
        wait_until(lambda: _forgotten(client, first), RESULT_TIMEOUT_S,
                   message="the task forgotten by retention")

        second = client.submit("math", "2 + 2", queue=queue, idempotency_key=key)
        assert second != first
        assert client.result(second, timeout_s=RESULT_TIMEOUT_S) == "4"


def _forgotten(client: qm.Client, task_id: str) -> bool:
    try:
        client.status(task_id)
        return False
    except RemoteError as exc:
        return exc.code is grpc.StatusCode.NOT_FOUND


# -- qm.aio.Client -------------------------------------------------------------------------

def test_the_asyncio_client_has_the_methods_of_the_blocking_one(stack, launcher):
    idle_queue = launcher.queue(stack.broker_url)  # no worker: its task stays QUEUED until cancelled

    async def body():
        async with qm.aio.Client(stack.server.address) as client:
            task_id = await client.submit("math", "1 + 2 * 5", queue=stack.queue)
            assert await client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "11"
            assert (await client.status(task_id)) == stack.client.status(task_id)
            assert [s.state async for s in client.watch([task_id])] == ["SUCCEEDED"]

            ids = await client.submit_many([("math", "2 * 2"), ("test.fail", "on purpose")],
                                           queue=stack.queue)
            finals = {s.task_id: s async for s in client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
            assert (finals[ids[0]].result, finals[ids[1]].state) == ("4", "FAILED")
            with pytest.raises(TaskError, match="on purpose"):
                await client.result(ids[1])
            with pytest.raises(BatchError) as caught:
                await client.submit_many([("math", "1"), ("math", "1 +")], queue=stack.queue)
            assert len(caught.value.accepted_ids) == 1 and caught.value.refused[0].index == 1

            queued = await client.submit("test.echo", "never", queue=idle_queue)
            assert (await client.cancel(queued)).state == "CANCELLED"
            assert await client.task_types() == stack.client.task_types()
            assert {w.worker_id for w in await client.workers()} == \
                {w.worker_id for w in stack.client.workers()}
            wait_until(lambda: stack.client.dead_letters()[1] == 1, RESULT_TIMEOUT_S,
                       message="the dead letter")
            letters, total = await client.dead_letters()
            assert total == 1 and letters[0].task_id == ids[1] and letters == stack.client.dead_letters()[0]
            with pytest.raises(RemoteError) as missing:
                await client.requeue_dead_letters(["no-such-task"])
            assert missing.value.code is grpc.StatusCode.NOT_FOUND
            assert await client.purge_dead_letters() >= 0
            with pytest.raises(RemoteError) as reused:
                await client.submit("math", "1", idempotency_key="k-aio", queue=stack.queue)
                await client.submit("math", "2", idempotency_key="k-aio", queue=stack.queue)
            assert reused.value.code is grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(asyncio.wait_for(body(), RESULT_TIMEOUT_S * 2))


@pytest.mark.parametrize("batch_submits", [True, False], ids=["batched", "one-call-each"])
def test_the_asyncio_client_takes_thousands_of_submits_at_once(stack, launcher, batch_submits):
    """gRPC resets calls past about 1000 pending on the server; the client keeps its own
    in flight under that, so a gather over 1500 submits gets 1500 ids, whether they go
    out together (the default) or each as its own call."""
    queue = launcher.queue(stack.broker_url)  # no worker: nothing runs

    async def body() -> list[str]:
        async with qm.aio.Client(stack.server.address, batch_submits=batch_submits) as client:
            submits = (client.submit("test.echo", str(i), queue=queue) for i in range(1500))
            return await asyncio.gather(*submits)

    ids = asyncio.run(asyncio.wait_for(body(), RESULT_TIMEOUT_S * 2))
    assert len(set(ids)) == 1500


def handled_calls(metrics_url: str) -> dict[str, float]:
    """qm-server's count of handled TaskQueue calls by method, from its /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qm_server_grpc_handling_seconds_count":
                method = sample.labels["method"]
                calls[method] = calls.get(method, 0.0) + sample.value
    return calls


def test_gathered_asyncio_submits_share_calls_and_each_is_answered_as_it_would_be_alone(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    metrics_port = free_port()
    server = launcher.server(rabbitmq.url, extra_args=["--metrics-port", str(metrics_port)])
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    payloads = [f"{i} + 1" for i in range(300)]
    payloads[7] = "1 +"  # refused: not an expression

    async def body():
        async with qm.aio.Client(server.address) as client:
            outcomes = await asyncio.gather(*(client.submit("math", p, queue=queue) for p in payloads),
                                            return_exceptions=True)
            with pytest.raises(RemoteError) as alone:
                await client.submit("math", "1 +", queue=queue)
            ids = [outcome for outcome in outcomes if isinstance(outcome, str)]
            finals = {s.task_id: s async for s in client.results(ids, timeout_s=RESULT_TIMEOUT_S)}
            return outcomes, alone.value, finals

    outcomes, alone, finals = asyncio.run(asyncio.wait_for(body(), RESULT_TIMEOUT_S * 2))
    refused = outcomes[7]
    assert isinstance(refused, RemoteError), refused
    assert (refused.code, refused.reason, str(refused)) == (alone.code, alone.reason, str(alone))
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT and "payload" in str(refused)
    accepted = [(i, outcome) for i, outcome in enumerate(outcomes) if i != 7]
    assert len({task_id for _i, task_id in accepted}) == 299
    assert all(finals[task_id].result == str(i + 1) for i, task_id in accepted)
    calls = handled_calls(f"http://127.0.0.1:{metrics_port}/metrics")
    assert calls.get("SubmitTask") == 1, calls  # only the lone submit had a call of its own
    assert 1 <= calls.get("SubmitTasks", 0) <= 10, calls


def test_threads_sharing_a_client_share_calls_and_each_is_answered_as_it_would_be_alone(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    metrics_port = free_port()
    server = launcher.server(rabbitmq.url, extra_args=["--metrics-port", str(metrics_port)])
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    threads, per_thread = 16, 20
    outcomes: dict[int, object] = {}

    with qm.Client(server.address) as client:
        def submit_some(first: int) -> None:
            for i in range(first, first + per_thread):
                payload = "1 +" if i == 7 else f"{i} + 1"  # item 7 is refused: not an expression
                try:
                    outcomes[i] = client.submit("math", payload, queue=queue)
                except RemoteError as exc:
                    outcomes[i] = exc

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(submit_some, range(0, threads * per_thread, per_thread)))
        with pytest.raises(RemoteError) as alone:
            client.submit("math", "1 +", queue=queue)
        accepted = {i: task_id for i, task_id in outcomes.items() if i != 7}
        finals = {s.task_id: s for s in client.results(list(accepted.values()), timeout_s=RESULT_TIMEOUT_S)}

    refused = outcomes[7]
    assert isinstance(refused, RemoteError), refused
    assert (refused.code, refused.reason, str(refused)) == (alone.value.code, alone.value.reason, str(alone.value))
    assert len(set(accepted.values())) == threads * per_thread - 1
    assert all(finals[task_id].result == str(i + 1) for i, task_id in accepted.items())
    calls = handled_calls(f"http://127.0.0.1:{metrics_port}/metrics")
    # Threads that submitted while two calls were out shared the next one.
    assert calls.get("SubmitTasks", 0) >= 1, calls
    assert calls.get("SubmitTask", 0) + calls.get("SubmitTasks", 0) < threads * per_thread, calls
