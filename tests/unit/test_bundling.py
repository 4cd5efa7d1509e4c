"""The servers' half of bundles (qm/server/bundling.py) on the in-memory broker: which
tasks share a message, and when tasks go one a message as before."""
from __future__ import annotations

import asyncio

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.messages import TaskMessage, decode_bundle
from qm.protocol import Feature, Header
from qm.server.bundling import BATCH, TINY_BELOW_S, TINY_UNTIL_S, Bundler, RunTimes
from qm.server.workers import WorkerDirectory
from tests.unit.aio import run, within
from tests.unit.test_workers import beat

WORK_QUEUE = topology.work_queue_name("default")


def test_a_type_is_tiny_once_its_mean_run_is_short_and_stays_so_until_clearly_slower():
    times = RunTimes(frozenset({"math", "sim"}))
    assert not times.tiny("math")  # no history: one task a message
    times.observe("math", 0.0002)
    assert times.tiny("math")
    for _ in range(3):
        times.observe("math", (TINY_BELOW_S + TINY_UNTIL_S) / 2)  # between the thresholds: no flapping
    assert times.tiny("math")
    for _ in range(10):
        times.observe("math", 0.5)
    assert not times.tiny("math")
    times.observe("sim", 30.0)
    assert not times.tiny("sim")
    times.observe("unknown", 0.0001)
    assert not times.tiny("unknown")  # only installed types are kept


def test_bundles_go_only_to_queues_whose_every_live_worker_reads_them():
    now = [1000.0]
    directory = WorkerDirectory(MemoryBroker(), lost_after_s=30.0, clock=lambda: now[0])
    assert not directory.all_read("default", Feature.BUNDLES)  # nobody there: an old one may come
    directory.on_heartbeat(beat("new", features=(Feature.BUNDLES,)))
    assert directory.all_read("default", Feature.BUNDLES)
    assert not directory.all_read("other", Feature.BUNDLES)
    directory.on_heartbeat(beat("old"))
    assert not directory.all_read("default", Feature.BUNDLES)
    now[0] += 20.0
    directory.on_heartbeat(beat("new", features=(Feature.BUNDLES,)))
    now[0] += 20.0  # the old one has been silent 40 s: lost, no longer counted
    assert directory.all_read("default", Feature.BUNDLES)


async def broker_with_work_queue() -> MemoryBroker:
    broker = MemoryBroker()
    await broker.connect()
    await broker.declare_exchange(topology.TASKS_EXCHANGE, "direct")
    await broker.declare_queue(WORK_QUEUE)
    await broker.bind_queue(WORK_QUEUE, topology.TASKS_EXCHANGE, topology.routing_key("default"))
    return broker


def tiny_math() -> RunTimes:
    times = RunTimes(frozenset({"math", "sim"}))
    times.observe("math", 0.0001)
    return times


async def publish_all(bundler: Bundler, messages: list[TaskMessage], batch: bool = True) -> None:
    token = BATCH.set(batch)
    try:
        await within(asyncio.gather(*(bundler.publish(m, m.encode()) for m in messages)))
    finally:
        BATCH.reset(token)


def messages(count: int, task_type: str = "math") -> list[TaskMessage]:
    return [TaskMessage(f"t{n}", task_type, b"1 + 1", "default") for n in range(count)]


def waiting(broker: MemoryBroker) -> list[list[str]]:
    """The task ids of each message on the work queue, in order."""
    found = []
    for message in broker._queues[WORK_QUEUE]:
        bodies = decode_bundle(message.body) if Header.BUNDLE in message.headers else [message.body]
        if Header.BUNDLE in message.headers:
            assert message.headers[Header.BUNDLE] == len(bodies)
        found.append([TaskMessage.decode(body).task_id for body in bodies])
    return found


def test_a_batchs_tiny_tasks_of_one_turn_share_messages_of_at_most_the_cap():
    async def body():
        broker = await broker_with_work_queue()
        bundler = Bundler(broker, tiny_math(), lambda queue, feature: True, max_tasks=16)
        await publish_all(bundler, messages(40))
        assert waiting(broker) == [[f"t{n}" for n in range(s, min(s + 16, 40))] for s in (0, 16, 32)]
        assert bundler.metrics.bundled_tasks._value.get() == 40
    run(body)


def test_tasks_go_one_a_message_when_a_condition_for_bundles_fails():
    async def body():
        cases = {
            "outside a batch (a lone submit)": dict(batch=False),
            "a type not measured tiny": dict(task_type="sim"),
            "a worker that cannot read bundles": dict(all_read=False),
            "bundles turned off (server.bundle_max_tasks 1)": dict(max_tasks=1),
        }
        for case, options in cases.items():
            broker = await broker_with_work_queue()
            readers_ok = bool(options.get("all_read", True))
            bundler = Bundler(broker, tiny_math(), lambda q, f, ok=readers_ok: ok,
                              max_tasks=int(options.get("max_tasks", 16)))
            await publish_all(bundler, messages(5, options.get("task_type", "math")), batch=options.get("batch", True))
            assert waiting(broker) == [[f"t{n}"] for n in range(5)], case
    run(body)


def test_near_the_queue_cap_tasks_go_one_a_message():
    """broker.max_queue_length counts messages: bundles only while depth x cap-per-bundle fits."""
    async def body():
        broker = await broker_with_work_queue()
        clock = [0.0]
        bundler = Bundler(broker, tiny_math(), lambda q, f: True, max_tasks=4, max_queue_length=100,
                          clock=lambda: clock[0])
        await publish_all(bundler, messages(8))
        assert len(waiting(broker)) == 2  # depth 0: room
        for message in messages(30):
            await broker.publish(topology.TASKS_EXCHANGE, "default", message.encode(), message.headers())
        await publish_all(bundler, messages(4))
        assert len(waiting(broker)) == 2 + 30 + 1  # the depth read moments ago (2) still counts: 2 x 4 < 100
        clock[0] += 2.0  # read again: 33 messages x 4 > 100
        await publish_all(bundler, messages(4))
        assert waiting(broker)[-4:] == [["t0"], ["t1"], ["t2"], ["t3"]]
    run(body)


def test_an_outcome_event_carries_its_runs_time_as_the_child_measured_it():
    """What RunTimes learns from: TaskEvent.run_s, packed or alone (0 from older workers)."""
    from qm.messages import TaskEvent, pack_events
    from qm.states import TaskState

    event = TaskEvent("t1", "math", "default", 1, TaskState.SUCCEEDED, "w1", b"2", run_s=0.00031)
    assert TaskEvent.decode(event.encode()).run_s == 0.00031
    assert [e.run_s for e in TaskEvent.decode_all(pack_events([event.to_proto()] * 2))] == [0.00031] * 2
    older = TaskEvent("t1", "math", "default", 1, TaskState.SUCCEEDED, "w1", b"2")
    assert TaskEvent.decode(older.encode()).run_s == 0.0
