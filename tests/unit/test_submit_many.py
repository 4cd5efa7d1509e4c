"""TaskService.submit_many (the SubmitTasks RPC): one outcome per item in order, per-item
errors and idempotency keys, the batch cap. MemoryBroker, no worker."""
from __future__ import annotations

import pytest

from qm.errors import IdempotencyKeyReused, UnknownTaskType, ValidationError
from qm.server.store import TaskRecord
from qm.server.submission import Submission
from qm.states import TaskState
from tests.unit.aio import run
from tests.unit.harness import WORK_QUEUE, server

S = TaskState


def test_a_batch_gives_one_outcome_per_item_in_order_and_a_refused_item_stops_no_other(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            items = [Submission("math", b"1 + 1"), Submission("no.such.type", b"x"),
                     Submission("test.echo", b"third", queue="batch.q"), Submission("math", b"1 +"),
                     Submission("math", b"2 * 3")]
            outcomes = await parts.service.submit_many(items)

            accepted_at = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, TaskRecord)]
            assert accepted_at == [0, 2, 4]
            assert isinstance(outcomes[1], UnknownTaskType) and "no.such.type" in str(outcomes[1])
            assert isinstance(outcomes[3], ValidationError)
            assert outcomes[3].field == "payload"
            accepted = [outcomes[i] for i in (0, 2, 4)]
            assert [(r.type, r.queue, r.state) for r in accepted] == \
                [("math", "default", S.QUEUED), ("test.echo", "batch.q", S.QUEUED),
                 ("math", "default", S.QUEUED)]
            assert len({r.task_id for r in accepted}) == 3
            assert [await parts.store.get(r.task_id) for r in accepted] == accepted  # durable, nothing else stored
            assert await parts.store.count() == 3
            assert parts.broker.queue_depth(WORK_QUEUE) == 2
            assert parts.broker.queue_depth("qm.tasks.batch.q") == 1
    run(body)


def test_each_item_is_idempotent_like_a_lone_submit(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            earlier = await parts.service.submit("math", b"1 + 1", idempotency_key="k-earlier")
            items = [Submission("math", b"1 + 1", idempotency_key="k-earlier"),
                     Submission("math", b"2 + 2", idempotency_key="k-twice"),
                     Submission("math", b"2 + 2", idempotency_key="k-twice"),
                     Submission("math", b"3 + 3", idempotency_key="k-new")]
            first = await parts.service.submit_many(items)
            again = await parts.service.submit_many(items)  # the client's retry of the whole batch

            assert first[0].task_id == earlier.task_id
            assert first[1].task_id == first[2].task_id != first[3].task_id
            assert [r.task_id for r in again] == [r.task_id for r in first]
            assert await parts.store.count() == 3 and parts.broker.queue_depth(WORK_QUEUE) == 3
    run(body)


def test_a_batch_over_the_cap_is_refused_whole_naming_the_setting(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            parts.service.max_batch_items = 3
            cap = r"4 items exceed the limit of 3 .*server\.max_batch_items"
            with pytest.raises(ValidationError, match=cap):
                await parts.service.submit_many([Submission("math", b"1")] * 4)
            assert await parts.store.count() == 0
            assert len(await parts.service.submit_many([Submission("math", b"1")] * 3)) == 3
    run(body)


def test_a_reused_key_is_refused_while_the_first_request_is_still_in_flight(tmp_path):
    async def body():
        async with server(tmp_path) as parts:
            outcomes = await parts.service.submit_many([Submission("math", b"1 + 1", idempotency_key="k"),
                                                        Submission("math", b"2 + 2", idempotency_key="k")])
            assert isinstance(outcomes[0], TaskRecord)
            assert isinstance(outcomes[1], IdempotencyKeyReused)
            assert outcomes[1].task_id == outcomes[0].task_id
            assert await parts.store.count() == 1
    run(body)
