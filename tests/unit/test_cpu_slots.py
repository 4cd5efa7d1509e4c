"""CPU slots: the accounting, the pool's order (a big job is not overtaken), pinning and
QM_TASK_CPUS in real children, and the server's fit check."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from qm.errors import NoWorkerFits, ValidationError
from qm.messages import Heartbeat
from qm.registry import TaskType
from qm.server import fit, idempotency
from qm.server.workers import WorkerDirectory
from qm.states import TaskState
from qm.worker.cpu_slots import CpuSlots, pinning_cores
from qm.worker.pool import Job, Outcome, Pool
from tests.processes import Gate
from tests.unit.aio import run, within

ALLOWED = sorted(os.sched_getaffinity(0))


# -- accounting ------------------------------------------------------------------------------

def test_a_job_holds_as_many_slots_as_its_cpus_until_it_gives_them_back():
    slots = CpuSlots(4)
    assert slots.take("a", 3) == () and (slots.busy, slots.free) == (3, 1)
    assert slots.fits(1) and not slots.fits(2)
    slots.take("b", 1)
    assert slots.busy == 4 and not slots.fits(1)
    slots.give_back("a")
    assert (slots.busy, slots.free) == (1, 3) and slots.fits(3)
    slots.give_back("a")  # twice is harmless
    assert slots.busy == 1
    with pytest.raises(RuntimeError):
        slots.take("c", 4)


def test_pinned_slots_map_to_distinct_cores_and_a_preferred_slot_is_taken_over():
    slots = CpuSlots(3, cores=(10, 11, 12))
    assert slots.take("a", 2) == (10, 11)
    assert slots.take("b", 1) == (12,)
    slots.give_back("a")
    assert slots.take("c", 1, prefer=(1,)) == (11,)  # a pipelined job takes over its predecessor's slot
    assert slots.held("c") == (1,)


def test_pinning_only_when_every_slot_can_have_its_own_cpu():
    assert pinning_cores(len(ALLOWED)) == tuple(ALLOWED)
    assert pinning_cores(len(ALLOWED) + 1) == ()
    assert pinning_cores(1, pin=False) == ()


# -- the pool, with real children ------------------------------------------------------------

def probe(task_id: str, cpus: int, **payload) -> Job:
    return Job(task_id, "test.slot_probe", json.dumps(payload).encode(), cpus=cpus)


def test_a_big_job_waits_for_its_slots_and_nothing_behind_it_overtakes_it(tmp_path):
    """procs 2: a 1-CPU job runs; a 2-CPU job waits; a 1-CPU job after it waits too, though
    a child and a slot are free, so the big one is never starved; they start in order."""
    async def body():
        pool = Pool(2)
        await pool.start()
        try:
            started: list[tuple[str, int]] = []  # (task, CPU slots busy once it started)

            def on_started(task_id: str):
                return lambda: started.append((task_id, pool.busy_cpus))

            gate = Gate(tmp_path)
            small = asyncio.create_task(pool.run(probe("small", 1, gate=str(gate.path)), on_started("small")))
            await within(_until(lambda: started == [("small", 1)]))
            big = asyncio.create_task(pool.run(probe("big", 2), on_started("big")))
            after = asyncio.create_task(pool.run(probe("after", 1), on_started("after")))
            for _ in range(20):
                await asyncio.sleep(0)
            assert started == [("small", 1)] and pool.busy == 1 and pool.idle == 1
            gate.open()
            outcomes = await within(asyncio.gather(small, big, after))
            assert [outcome.state for outcome in outcomes] == [TaskState.SUCCEEDED] * 3
            assert started == [("small", 1), ("big", 2), ("after", 1)]
            results = [json.loads(outcome.result) for outcome in outcomes]
            assert [result["task_cpus"] for result in results] == [1, 2, 1]
            assert [result["subprocess_env"] for result in results] == ["1", "2", "1"]
            big_run = (results[1]["started_at"], results[1]["ended_at"])
            for other in (results[0], results[2]):
                assert other["ended_at"] <= big_run[0] or other["started_at"] >= big_run[1], (other, big_run)
            assert pool.busy_cpus == 0
        finally:
            await within(pool.stop())
    run(body)


@pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning two slots needs two CPUs")
def test_pinned_children_run_on_their_slots_cpus_only():
    async def body():
        pool = Pool(2, cores=ALLOWED[:2])
        await pool.start()
        try:
            two = json.loads((await within(pool.run(probe("two", 2)))).result)
            one = json.loads((await within(pool.run(probe("one", 1)))).result)
            assert two["affinity"] == ALLOWED[:2] and two["task_cpus"] == 2
            assert len(one["affinity"]) == 1 and one["affinity"][0] in ALLOWED[:2] and one["task_cpus"] == 1
        finally:
            await within(pool.stop())
    run(body)


def test_unpinned_children_keep_every_cpu_and_are_told_their_count():
    async def body():
        pool = Pool(1)
        await pool.start()
        try:
            result = json.loads((await within(pool.run(probe("one", 1)))).result)
            assert result["affinity"] == ALLOWED and result["task_cpus"] == 1
            with pytest.raises(ValueError, match="takes 2 CPU slots; this pool has 1"):
                await pool.run(probe("too-big", 2))
        finally:
            await within(pool.stop())
    run(body)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


# -- the server's side -------------------------------------------------------------------------

def probe_type(cpus: int = 1) -> TaskType:
    return TaskType("probe", handler=lambda value: value, cpus=cpus)


def test_cpus_resolve_from_the_submission_then_the_type_and_are_capped():
    assert fit.resolve_cpus(probe_type(), 0, 64) == 1
    assert fit.resolve_cpus(probe_type(4), 0, 64) == 4
    assert fit.resolve_cpus(probe_type(4), 2, 64) == 2
    with pytest.raises(ValidationError, match=r"5 exceeds the server's maximum of 4 \(server.max_task_cpus\)") as error:
        fit.resolve_cpus(probe_type(), 5, 4)
    assert error.value.field == "cpus"
    with pytest.raises(ValidationError, match="task type 'probe' declares cpus=8"):
        fit.resolve_cpus(probe_type(8), 0, 4)
    with pytest.raises(ValidationError, match="negative"):
        fit.resolve_cpus(probe_type(), -1, 4)


class _Delivery:
    def __init__(self, body: bytes) -> None:
        self.body = body


class _Broker:
    def ack(self, delivery) -> None:
        pass


def test_a_task_no_live_worker_of_its_queue_fits_is_refused_naming_the_fix():
    directory = WorkerDirectory(_Broker(), lost_after_s=30.0)  # type: ignore[arg-type]
    fit.check_fits(8, "q", directory)  # no worker known yet: accepted
    for worker_id, procs, queues, stopped in (("w2", 2, ("q",), False), ("w8", 8, ("other",), False),
                                              ("w4", 4, ("q",), True)):
        beat = Heartbeat(worker_id, "h", 1, procs, 0, queues, (), "0", stopped=stopped)
        directory.on_heartbeat(_Delivery(beat.encode()))  # type: ignore[arg-type]
    assert directory.largest_procs("q") == 2  # w8 serves another queue, w4 stopped
    fit.check_fits(2, "q", directory)
    with pytest.raises(NoWorkerFits) as error:
        fit.check_fits(3, "q", directory)
    assert error.value.field == "cpus"
    assert "asks for 3 CPUs" in str(error.value) and "--procs 2" in str(error.value)
    assert "--procs 3 or more" in str(error.value)


def test_the_idempotency_digest_covers_cpus_as_sent():
    def digest(cpus: int) -> str:
        return idempotency.request_digest("math", b"1", "default", 0.0, 0, {}, cpus=cpus)

    assert digest(0) == idempotency.request_digest("math", b"1", "default", 0.0, 0, {})  # older digests match
    assert len({digest(0), digest(1), digest(2)}) == 3


def test_a_multi_cpu_task_goes_to_its_sizes_work_queue_and_keeps_it_on_retry(tmp_path):
    from qm.broker import topology
    from tests.unit.harness import WORK_QUEUE, server
    from tests.unit.test_service import take_messages

    async def body():
        async with server(tmp_path) as parts:
            record = await parts.service.submit("test.echo", b"x", cpus=2)
            typed = await parts.service.submit("test.slot_probe2", b"{}")
            single = await parts.service.submit("test.echo", b"y")
            assert (record.cpus, typed.cpus, single.cpus) == (2, 2, 1)
            size_queue = topology.work_queue_name("default", cpus=2)
            assert size_queue == "qm.tasks.default.cpus2"
            assert parts.broker.queue_depth(size_queue) == 2 and parts.broker.queue_depth(WORK_QUEUE) == 1
            [message, _typed] = await take_messages(parts.broker, size_queue, 2)
            assert (message.task_id, message.cpus, message.routing_key) == (record.task_id, 2, "default.cpus2")
    run(body)


def test_a_logical_queue_may_not_be_named_like_a_size_queue():
    from qm.broker import topology

    assert "names the work queues of multi-CPU tasks" in (topology.queue_name_problem("a.cpus2") or "")
    assert topology.queue_name_problem("cpus2") is None and topology.queue_name_problem("a.cpus") is None


def test_clients_send_cpus_on_submit_and_per_batch_item():
    from qm.client.common import batch_requests, submit_request

    assert submit_request("test.echo", "x").cpus == 0  # the type's
    assert submit_request("test.echo", "x", cpus=3).cpus == 3
    requests = batch_requests([("test.echo", "a"), ("test.echo", "b", {"cpus": 4})], {"cpus": 2})
    assert [request.cpus for request in requests] == [2, 4]


@pytest.mark.parametrize(
    ("cpus", "queue", "key"),
    [(2, "qm.tasks.default.cpus2", "default.cpus2"), (1, "qm.tasks.default.p7", "default.p7")],
)
def test_a_priority_9_task_goes_to_its_sizes_queue_or_its_band_and_its_retry_comes_back_there(
    tmp_path, cpus, queue, key
):
    """Multi-CPU queues carry no priority bands: a cpus=2 task of priority 9 waits in the
    size queue (keeping its priority), a cpus=1 one in the high band; the retry's delay tier
    keeps the routing key, so the next attempt comes back to the same queue."""
    from qm import retry
    from qm.broker import topology
    from qm.metrics import WorkerMetrics
    from qm.worker.outcomes import Outcomes
    from tests.unit.harness import server
    from tests.unit.test_service import take_messages

    async def body():
        async with server(tmp_path) as parts:
            await topology.declare_work_queue(parts.broker, "default", cpus=2)  # as a 2-procs worker does
            record = await parts.service.submit("test.echo", b"x", cpus=cpus, priority=9, max_retries=1)
            assert (record.cpus, record.priority) == (cpus, 9)
            assert topology.work_queue_name("default", priority=9, cpus=cpus) == queue
            [message] = await take_messages(parts.broker, queue, 1)
            assert (message.task_id, message.cpus, message.priority, message.routing_key) == (
                record.task_id, cpus, 9, key)

            published: list[tuple[str, str, bytes]] = []
            publish = parts.broker.publish

            async def recording(exchange, routing_key, body, headers=None):
                published.append((exchange, routing_key, body))
                await publish(exchange, routing_key, body, headers)

            parts.broker.publish = recording  # type: ignore[method-assign]
            outcomes = Outcomes(parts.broker, "w1", WorkerMetrics())
            for tier_s in retry.DELAY_TIERS_S:
                await outcomes.ensure_delay_tier(tier_s)
            acked = []
            await within(outcomes.settle(message, Outcome(TaskState.FAILED, error="boom"), lambda: acked.append(1)))
            [(_tier, tier_key, following)] = [item for item in published if item[0].startswith("qm.delay")]
            assert tier_key == key and acked == [1]
            # The tier dead-letters it to qm.tasks with the key it kept (RabbitMQ's rule):
            await publish(topology.TASKS_EXCHANGE, tier_key, following, {})
            [again] = await take_messages(parts.broker, queue, 1)
            assert (again.task_id, again.attempt, again.cpus, again.priority) == (record.task_id, 2, cpus, 9)
    run(body)


@pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning two slots needs two CPUs")
def test_a_pinned_child_stays_on_its_core_from_task_to_task(tmp_path):
    """Rounds of one long and one short task, then a lone one: whichever child is idle
    first, each child runs every task on the same core (no move between cores)."""
    async def body():
        pool = Pool(2, cores=ALLOWED[:2])
        await pool.start()
        cores_of: dict[int, set[tuple[int, ...]]] = {}

        async def probed(name: str, hold_s: float) -> None:
            started = tmp_path / name
            outcome = await within(pool.run(probe(name, 1, hold_s=hold_s, started_file=str(started))))
            assert outcome.state is TaskState.SUCCEEDED, outcome.error
            cores_of.setdefault(int(started.read_text()), set()).add(tuple(json.loads(outcome.result)["affinity"]))

        try:
            for round_ in range(4):
                long_s, short_s = (0.4, 0.0) if round_ % 2 else (0.0, 0.4)
                await asyncio.gather(probed(f"a{round_}", long_s), probed(f"b{round_}", short_s))
                await probed(f"lone{round_}", 0.0)
        finally:
            await within(pool.stop())
        assert len(cores_of) == 2, cores_of  # both children ran tasks
        assert all(len(cores) == 1 for cores in cores_of.values()), cores_of
        assert set().union(*cores_of.values()) == {(ALLOWED[0],), (ALLOWED[1],)}
    run(body)
