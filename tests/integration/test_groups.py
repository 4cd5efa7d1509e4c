"""Groups with a final callback (issue 14, item 4): submit_group(items, then=...) runs the
callback once, after every member finished, with their results in order and the failures;
`qm submit-group`, `qm status GROUP_ID`, qm.aio.Client and qm.Executor.map on groups.
Real qm-server, qm-worker and RabbitMQ (the fault cases are in tests/faults/test_group_faults.py)."""
from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import pytest

import qm.aio
from qm.client.client import RemoteError
from qm.reasons import Reason
from tests.processes import run_qm

#: Bound on a group's members and callback finishing.
RESULT_TIMEOUT_S = 90.0


def run_group(client, group_id: str) -> qm.client.client.TaskStatus:
    """Wait for every member, then for the callback (it exists once the last one finished)."""
    group = client.group_status(group_id)
    list(client.results(group.task_ids, timeout_s=RESULT_TIMEOUT_S))
    return list(client.results([client.group_status(group_id).callback_task_id], timeout_s=RESULT_TIMEOUT_S))[-1]


def log_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_callback_runs_once_with_every_result_in_member_order(stack, tmp_path):
    log = tmp_path / "callback.log"
    items = [("math", f"{i} * 3") for i in range(12)]

    group_id = stack.client.submit_group(items, then=("test.group_record", {"log": str(log)}), queue=stack.queue)
    callback = run_group(stack.client, group_id)

    assert callback.state == "SUCCEEDED", callback.error
    assert callback.result["results"] == [str(i * 3) for i in range(12)]  # member order
    assert callback.result["sum"] == sum(i * 3 for i in range(12)) and callback.result["failed"] == []
    assert [line["group_id"] for line in log_lines(log)] == [group_id]  # ran once
    group = stack.client.group_status(group_id)
    assert (group.members, group.finished, group.counts) == (12, 12, {"SUCCEEDED": 12})
    assert group.callback_state == "SUCCEEDED" and group.completed_at is not None and group.done
    assert stack.client.status(group.task_ids[0]).group_id == group_id
    assert stack.client.status(callback.task_id).group_id == group_id


def test_a_failing_member_is_listed_and_the_callback_still_runs(stack, tmp_path):
    items = [("math", "1 + 1"), ("test.fail", "member one fails"), ("math", "2 + 2")]

    group_id = stack.client.submit_group(items, then=("test.group_record", {}), queue=stack.queue)
    callback = run_group(stack.client, group_id)

    assert callback.state == "SUCCEEDED", callback.error
    assert callback.result["results"] == ["2", None, "4"] and callback.result["sum"] == 6
    assert callback.result["failed"] == [1] and "member one fails" in callback.result["errors"][0]
    assert stack.client.group_status(group_id).counts == {"SUCCEEDED": 2, "FAILED": 1}


def test_a_cancelled_member_counts_and_a_group_without_callback_completes(stack, gates):
    gate = gates()
    group_id = stack.client.submit_group([("math", "5"), ("test.wait_for", gate.payload)], queue=stack.queue)
    group = stack.client.group_status(group_id)
    stack.client.cancel(group.task_ids[1])
    list(stack.client.results(group.task_ids, timeout_s=RESULT_TIMEOUT_S))

    group = stack.client.group_status(group_id)
    assert group.counts == {"SUCCEEDED": 1, "CANCELLED": 1} and group.finished == 2
    assert group.callback_task_id == "" and group.completed_at is not None and group.done


def test_a_bad_member_refuses_the_whole_group_naming_it(stack):
    with pytest.raises(RemoteError) as caught:
        stack.client.submit_group([("math", "1"), ("math", "1 +")], then=("test.group_record", {}),
                                  queue=stack.queue)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT and "items[1].payload" in str(caught.value)
    with pytest.raises(RemoteError) as caught:
        stack.client.submit_group([("math", "1")], then=("no.such.type", ""), queue=stack.queue)
    assert "then.type" in str(caught.value)
    with pytest.raises(RemoteError) as caught:
        stack.client.submit_group([], queue=stack.queue)
    assert "items" in str(caught.value) and "at least one" in str(caught.value)


def test_an_unknown_group_is_not_found_and_a_repeated_key_is_the_same_group(stack):
    with pytest.raises(RemoteError) as caught:
        stack.client.group_status(str(uuid.uuid4()))
    assert caught.value.code is grpc.StatusCode.NOT_FOUND and caught.value.reason == Reason.GROUP_NOT_FOUND

    key = f"group-{uuid.uuid4().hex}"
    items = [("math", f"{i} + 1") for i in range(3)]
    first = stack.client.submit_group(items, then=("test.group_record", {}), idempotency_key=key, queue=stack.queue)
    again = stack.client.submit_group(items, then=("test.group_record", {}), idempotency_key=key, queue=stack.queue)
    assert again == first
    with pytest.raises(RemoteError) as caught:  # the same key for another group
        stack.client.submit_group(items[:2], idempotency_key=key, queue=stack.queue)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert run_group(stack.client, first).result["sum"] == 6


def test_the_cli_submits_a_group_waits_for_its_callback_and_shows_its_counts(stack, tmp_path):
    members = tmp_path / "exprs.txt"
    members.write_text("1 + 2\n\n2 * 5\n7\n")

    done = run_qm("submit-group", "-T", "math", "--from-file", str(members), "--then", "examples.sum_results",
                  "--queue", stack.queue, "--wait", "--wait-timeout", str(RESULT_TIMEOUT_S),
                  server=stack.server.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sum": 20, "count": 3, "failed": 0, "failures": []}

    submitted = run_qm("submit-group", "-T", "math", "--from-file", str(members), "--queue", stack.queue, "--json",
                       server=stack.server.address)
    group_id = json.loads(submitted.stdout)["group_id"]
    list(stack.client.results(stack.client.group_status(group_id).task_ids, timeout_s=RESULT_TIMEOUT_S))
    shown = run_qm("status", group_id, server=stack.server.address)
    assert shown.returncode == 0, shown.stderr
    assert "members   3 (3 finished)" in shown.stdout and "SUCCEEDED 3" in shown.stdout
    assert "callback  none" in shown.stdout
    missing = run_qm("status", str(uuid.uuid4()), server=stack.server.address)
    assert missing.returncode == 1 and "no task with id" in missing.stderr


def test_the_asyncio_client_submits_a_group_and_reads_its_status(stack):
    async def main():
        async with qm.aio.Client(stack.server.address) as client:
            group_id = await client.submit_group([("math", "6 * 7")], then=("examples.sum_results", None),
                                                 queue=stack.queue)
            group = await client.group_status(group_id)
            [member] = [status async for status in client.results(group.task_ids, timeout_s=RESULT_TIMEOUT_S)]
            callback_id = (await client.group_status(group_id)).callback_task_id
            return member.result, await client.result(callback_id, timeout_s=RESULT_TIMEOUT_S)

    assert asyncio.run(main()) == ("42", {"sum": 42, "count": 1, "failed": 0, "failures": []})
