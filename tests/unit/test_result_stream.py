"""What a StreamTaskResults stream sends for queued records: one response each, or (batched)
the statuses ready at once packed into one response, never past its byte cap."""
from __future__ import annotations

import asyncio

from qm.server.result_stream import RESPONSE_BYTES, StreamOptions, responses
from qm.server.store_api import TaskRecord
from qm.states import TaskState
from tests.unit.aio import run, within

S = TaskState


def finished(task_id: str, result: bytes = b"11") -> TaskRecord:
    return TaskRecord(task_id, "math", "default", "text", S.SUCCEEDED, 1, result, "", "w", 1.0, 2.0, 3.0, 3.0)


def running(task_id: str) -> TaskRecord:
    return TaskRecord(task_id, "math", "default", "text", S.RUNNING, 1, None, "", "w", 1.0, 2.0, None, 2.0)


async def _collect(stream):
    return [response async for response in stream]


def sent_for(records: list[TaskRecord], options: StreamOptions) -> list:
    """Every response for `records`, all queued at once, then the client's half-close."""
    async def body():
        updates: asyncio.Queue = asyncio.Queue()
        for record in [*records, None]:
            updates.put_nowait(record)
        return await within(_collect(responses(updates, {record.task_id for record in records}, options)))

    return run(body)


def test_an_unbatched_stream_sends_one_response_per_status_in_status():
    ids = [f"t{n}" for n in range(5)]
    got = sent_for([finished(task_id) for task_id in ids], StreamOptions())
    assert [response.status.task_id for response in got] == ids
    assert all(not response.statuses for response in got)


def test_a_batched_stream_packs_what_is_ready_into_one_response_in_order_once_each():
    ids = [f"t{n}" for n in range(300)]
    records = [running(ids[0]), *(finished(task_id) for task_id in ids), finished(ids[0])]  # a repeat: not sent again
    got = sent_for(records, StreamOptions(batched=True))
    assert len(got) == 1 and not got[0].HasField("status")
    assert [(status.task_id, S.of_number(status.state)) for status in got[0].statuses] == [
        (ids[0], S.RUNNING), *((task_id, S.SUCCEEDED) for task_id in ids)
    ]


def test_a_batched_response_stays_under_its_byte_cap_and_a_larger_status_goes_alone():
    quarter = b"r" * (RESPONSE_BYTES // 4)
    ids = [f"t{n}" for n in range(10)]
    records = [finished(task_id, quarter) for task_id in ids[:9]] + [finished(ids[9], b"R" * (RESPONSE_BYTES + 1))]
    got = sent_for(records, StreamOptions(batched=True, final_only=True))
    assert [status.task_id for response in got for status in response.statuses] == ids  # all, in order, once
    assert all(len(response.statuses) > 1 for response in got[:-1])  # packed, not one each
    for response in got[:-1]:
        assert response.ByteSize() <= RESPONSE_BYTES + 64 * len(response.statuses)  # the cap, plus framing
    assert [len(got[-1].statuses), len(got[-1].statuses[0].result)] == [1, RESPONSE_BYTES + 1]


def test_a_batched_stream_sends_a_change_that_comes_later_in_a_response_of_its_own():
    async def body():
        updates: asyncio.Queue = asyncio.Queue()
        stream = responses(updates, {"a", "b"}, StreamOptions(batched=True))
        updates.put_nowait(running("a"))
        updates.put_nowait(finished("b"))
        first = await within(stream.__anext__())
        updates.put_nowait(finished("a"))
        updates.put_nowait(None)
        rest = await within(_collect(stream))
        return first, rest

    first, rest = run(body)
    assert [(s.task_id, S.of_number(s.state)) for s in first.statuses] == [("a", S.RUNNING), ("b", S.SUCCEEDED)]
    assert [[(s.task_id, S.of_number(s.state)) for s in r.statuses] for r in rest] == [[("a", S.SUCCEEDED)]]


def test_a_server_with_a_small_message_limit_packs_at_most_half_of_it():
    from qm.server.result_stream import response_bytes

    assert response_bytes(4 * 1024 * 1024) == RESPONSE_BYTES
    cap = response_bytes(8 * 1024)  # server.max_message_bytes of 8 KiB
    assert cap == 4 * 1024
    ids = [f"t{n}" for n in range(40)]
    options = StreamOptions(batched=True, response_bytes=cap)
    got = sent_for([finished(task_id, b"x" * 300) for task_id in ids], options)
    assert [status.task_id for response in got for status in response.statuses] == ids
    assert len(got) > 1 and all(response.ByteSize() <= cap + 8 * len(response.statuses) for response in got)
