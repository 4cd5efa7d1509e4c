"""Adaptive prefetch (qm.worker.prefetch): one delivery per child while tasks are long, more
as they get shorter (2 per child for moderate tasks, 4 for short ones, 16 for tiny ones),
without flapping around a threshold, judged by the children's own clock; `--prefetch N`
never changes. When it drops, the worker gives back what waits beyond it (over the
in-memory broker, with a real pool)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time

import pytest

from qm.broker import topology
from qm.broker.memory import MemoryBroker
from qm.errors import PublishOutcomeUnknown
from qm.protocol import Header
from qm.states import TaskState
from qm.worker import supervisor as supervisor_module
from qm.worker.jobs import ReplyKind
from qm.worker.pool import Pool
from qm.worker.prefetch import AutoPrefetch, FixedPrefetch
from qm.worker.supervisor import Supervisor
from tests.unit import harness
from tests.unit.aio import run, within
from tests.unit.harness import WORK_QUEUE, server

TINY_S = 0.001
SHORT_S = 0.01
MODERATE_S = 0.2
LONG_S = 5.0
#: Enough observations for the moving average to settle on a steady run time.
SETTLE = 40


def feed(policy, duration_s: float, count: int = SETTLE) -> list[int]:
    """Observe `count` tasks of `duration_s`; the values observe() returned (changes only)."""
    changes = []
    for _ in range(count):
        changed = policy.observe(duration_s)
        if changed is not None:
            changes.append(changed)
    return changes


@pytest.mark.parametrize("procs", [1, 3, 8])
def test_starts_at_one_delivery_per_child(procs):
    assert AutoPrefetch(procs).value == procs


@pytest.mark.parametrize("procs", [1, 3])
def test_short_tasks_move_it_to_four_per_child(procs):
    policy = AutoPrefetch(procs)
    changes = feed(policy, SHORT_S)
    assert policy.value == 4 * procs
    assert changes[-1] == 4 * procs


@pytest.mark.parametrize("procs", [1, 3])
def test_tiny_tasks_move_it_to_sixteen_per_child(procs):
    """Tasks of a millisecond: a deeper window, so that their events share packs and their
    acks are fewer (RabbitMQ's CPU per task about halved, load/README.md)."""
    policy = AutoPrefetch(procs)
    changes = feed(policy, TINY_S)
    assert policy.value == 16 * procs
    assert changes[-1] == 16 * procs


def test_one_long_run_after_tiny_tasks_drops_to_one_per_child_at_once():
    policy = AutoPrefetch(2)
    feed(policy, TINY_S)
    assert policy.value == 32
    assert feed(policy, 1.05, 1) == [2]


@pytest.mark.parametrize("procs", [1, 3])
def test_moderate_tasks_move_it_to_two_per_child(procs):
    policy = AutoPrefetch(procs)
    assert feed(policy, MODERATE_S) == [2 * procs]
    assert policy.value == 2 * procs


def test_moderate_tasks_after_short_ones_move_it_down_to_two_per_child():
    policy = AutoPrefetch(2)
    feed(policy, SHORT_S)
    assert feed(policy, MODERATE_S) == [4]
    assert policy.value == 4


def test_long_tasks_move_it_back_to_one_per_child():
    policy = AutoPrefetch(2)
    feed(policy, SHORT_S)
    assert policy.value == 8
    changes = feed(policy, LONG_S)
    assert changes and changes[-1] == 2
    assert policy.value == 2


def test_long_tasks_from_the_start_keep_one_per_child_and_report_no_change():
    policy = AutoPrefetch(4)
    assert feed(policy, LONG_S) == []
    assert policy.value == 4


def test_observe_returns_the_new_value_only_when_it_changes():
    policy = AutoPrefetch(2)
    results = [policy.observe(MODERATE_S) for _ in range(SETTLE)]
    assert results[0] == 4                      # the first observation changes it ...
    assert all(result is None for result in results[1:])  # ... and steady ones do not


def test_changes_report_each_distinct_value_once():
    policy = AutoPrefetch(1)
    changes = feed(policy, SHORT_S) + feed(policy, LONG_S) + feed(policy, MODERATE_S)
    assert all(a != b for a, b in itertools.pairwise(changes)), changes
    assert changes[-1] == 2


@pytest.mark.parametrize("between_s", [0.6, 0.75, 0.95])
def test_hysteresis_between_one_and_two_per_child(between_s):
    """Mean times between the 'up' (0.5 s) and 'down' (1 s) thresholds keep whatever level it is at."""
    slow = AutoPrefetch(1)
    feed(slow, LONG_S)
    assert feed(slow, between_s) == [] and slow.value == 1

    moderate = AutoPrefetch(1)
    feed(moderate, MODERATE_S)
    assert feed(moderate, between_s) == [] and moderate.value == 2


@pytest.mark.parametrize("slower_s, faster_s, values, between_s", [
    *((MODERATE_S, SHORT_S, (2, 4), between_s) for between_s in (0.025, 0.03, 0.035)),
    *((SHORT_S, TINY_S, (4, 16), between_s) for between_s in (0.006, 0.008, 0.0095)),
])
def test_hysteresis_between_neighbouring_levels(slower_s, faster_s, values, between_s):
    """Mean times between a level's two thresholds (0.02 s and 0.04 s for 4 per child,
    0.005 s and 0.01 s for 16) keep whatever level it is at, the slower or the faster."""
    for settled_s, value in zip((slower_s, faster_s), values, strict=True):
        policy = AutoPrefetch(1)
        feed(policy, settled_s)
        assert policy.value == value
        assert feed(policy, between_s) == [] and policy.value == value


def test_alternating_durations_around_a_threshold_do_not_flap():
    policy = AutoPrefetch(1)
    feed(policy, MODERATE_S)
    assert policy.value == 2
    # run times alternating between the two thresholds of the 2-per-child level (0.5 s up, 1 s down)
    changes = []
    for _ in range(50):
        changes += feed(policy, 0.95, 1) + feed(policy, 0.45, 1)
    assert changes == []
    assert policy.value == 2


def test_one_long_run_drops_to_one_per_child_at_once_and_it_stays_there():
    policy = AutoPrefetch(1)
    feed(policy, SHORT_S)
    assert policy.value == 4
    assert feed(policy, 1.05, 1) == [1]  # not after a moving average caught up: hoarding is costlier
    changes = []
    for _ in range(50):  # long runs keep coming between short ones: no flapping back up
        changes += feed(policy, 0.45, 1) + feed(policy, 1.05, 1)
    assert changes == [] and policy.value == 1


@pytest.mark.parametrize("run_s", [0.01, 0.25, 0.3, 0.45])
def test_a_child_holds_its_next_task_while_tasks_are_under_half_a_second(run_s):
    """CPU-bound tasks of a quarter second and more are pipelined too (their idle gap was the
    supervisor's wake-up, about 2 ms on a loaded host); tasks of 0.6 s are not, and a run
    past 1 s stops it at once."""
    policy = AutoPrefetch(2)
    feed(policy, run_s)
    assert policy.short and policy.value >= 2 * 2  # the pipe takes a delivery the worker holds anyway
    feed(policy, 1.05, 1)
    assert not policy.short


def test_tasks_over_half_a_second_are_not_pipelined():
    policy = AutoPrefetch(2)
    feed(policy, MODERATE_S)
    feed(policy, 0.6)
    assert not policy.short


@pytest.mark.parametrize("value", [1, 5, 100])
def test_fixed_prefetch_never_changes(value):
    policy = FixedPrefetch(value)
    for duration in (SHORT_S, MODERATE_S, LONG_S, 0.0, 1000.0):
        assert feed(policy, duration, 10) == []
        assert policy.value == value


def test_the_prefetch_follows_the_childrens_clock_not_a_late_supervisor(tmp_path, monkeypatch):
    """Tiny tasks reach 16 deliveries per child even when the supervisor reads each reply
    50 ms late, as on a busy host. Timed by the supervisor (as before), every run looked at
    least 50 ms long and the prefetch stayed at 2 per child."""
    late_s = 0.05
    handle_reply = Pool._handle_reply

    def late_handle_reply(self, slot, reply):
        if reply.kind not in (ReplyKind.READY, ReplyKind.PROGRESS):
            time.sleep(late_s)  # the supervisor's loop wakes up late for this outcome
        handle_reply(self, slot, reply)

    monkeypatch.setattr(Pool, "_handle_reply", late_handle_reply)

    async def body():
        prefetch = AutoPrefetch(1)
        async with harness.system(tmp_path, procs=1, prefetch=prefetch) as parts:
            # Until it gets there, bounded: a child's first task may be slow (a cold start on
            # a loaded host), and the moving average takes a few tasks to forget it.
            for n in range(60):
                records = await harness.submit_and_wait(parts.service, "test.echo", str(n).encode())
                assert records[-1].state is TaskState.SUCCEEDED and records[-1].result == str(n).encode()
                if prefetch.value == 16:
                    break
            return prefetch.value, prefetch.mean_s

    value, mean_s = run(body)
    assert mean_s is not None and mean_s < late_s
    assert value == 16


#: Bound on each wait of the give-back scenarios (real children on a busy machine).
HELD_BOUND_S = 30.0


async def until(condition, what: str) -> None:
    """Wait (bounded) until condition() holds."""
    deadline = asyncio.get_running_loop().time() + HELD_BOUND_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {HELD_BOUND_S} s"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def four_long_tasks_held(tmp_path, prefetch):
    """A one-child worker on the in-memory broker, four 30 s tasks submitted to it (at 4 per
    child it takes them all; one runs); yields (system parts, supervisor)."""
    async with server(tmp_path) as parts:
        pool = Pool(1, "forkserver")
        await pool.start()
        supervisor = Supervisor(parts.broker, pool, "w1", ["default"], prefetch=prefetch)
        await supervisor.start()
        try:
            for _ in range(4):
                await parts.service.submit("test.sleep", b"30")
            yield parts, supervisor
        finally:
            await within(supervisor.stop(drain_timeout_s=0.5), HELD_BOUND_S)
            await within(pool.stop(), HELD_BOUND_S)


def test_a_prefetch_drop_gives_back_every_delivery_waiting_beyond_it(tmp_path, caplog):
    """A worker with one child at 4 deliveries per child holds four long tasks: one runs,
    three wait. Once the running one has lasted LONG_TASK_S the prefetch drops to one per
    child, and each band consumer may keep only that many: all three waiting deliveries go
    back to the queue, as copies an idle worker can take (not redelivered). Counted across
    the three band consumers of the queue instead, two would stay hoarded behind the run."""

    def given_back() -> int | None:
        found = re.search(r"giving back (\d+) waiting deliveries", caplog.text)
        return int(found.group(1)) if found else None

    async def body():
        prefetch = AutoPrefetch(1)
        prefetch.level = 2  # short tasks came before: 4 per child
        async with four_long_tasks_held(tmp_path, prefetch) as (parts, supervisor):
            await until(lambda: given_back() is not None, "prefetch drop")
            await until(lambda: parts.broker.queue_depth(WORK_QUEUE) == given_back(), "copies in the queue")
            queued = list(parts.broker._queues[WORK_QUEUE])
            return given_back(), prefetch.value, len(supervisor._unsettled), [m.redelivered for m in queued]

    with caplog.at_level("INFO", logger="qm.worker.supervisor"):
        released, new_prefetch, still_held, redelivered = run(body)
    assert new_prefetch == 1
    assert released == 3, caplog.text
    assert still_held == 1  # the running task
    assert redelivered == [False, False, False]


def test_deliveries_of_a_lost_channel_are_not_given_back_but_still_run_here(tmp_path, caplog):
    """The connection goes as the prefetch drops: the broker requeued what the channel
    held, and no copy can be published. Given back, a waiting task would depend on the
    broker alone to run again (RabbitMQ 3.10 once lost one on a node kill); kept, it runs
    here as it would have. (A fixed prefetch of 4, so that only this test drops it.)"""

    async def body():
        async with four_long_tasks_held(tmp_path, 4) as (parts, supervisor):
            await until(lambda: len(supervisor._unsettled) == 4, "four deliveries held")
            parts.broker._drop_connection()  # the node goes away
            supervisor._release_excess(1)
            return len(supervisor._unsettled)

    with caplog.at_level("INFO", logger="qm.worker.supervisor"):
        held = run(body)
    assert "giving back" not in caplog.text
    assert held == 4


class NodeLosingBroker(MemoryBroker):
    """A broker of `nodes` nodes whose node the worker is connected to can go away
    (`lose_node`), at once or, `armed`, as the first copy given back is published (for
    0.05 s). With several nodes it returns none of the deliveries that channel held, as a
    RabbitMQ 3.10 quorum queue did with a consumer the prefetch swap had cancelled on a
    killed node (CI, cluster failover test); with one, it requeues them (marked
    redelivered), as any restart does. Deliveries of the work queue come marked
    redelivered if `redeliver` (their last worker died)."""

    def __init__(self, nodes: int = 2, redeliver: bool = False) -> None:
        super().__init__()
        self._node_count = nodes
        self.redeliver = redeliver
        self.armed = False

    @property
    def node_count(self) -> int:
        return self._node_count

    def lose_node(self, away_s: float) -> None:
        if self._node_count > 1:
            for consumer in self._consumers.values():
                consumer.unacked.clear()  # still checked out to the gone node's consumers
        self._drop_connection()
        asyncio.get_running_loop().call_later(away_s, lambda: asyncio.ensure_future(self.connect()))

    def _deliver(self, consumer, message):
        if self.redeliver and consumer.queue == WORK_QUEUE:
            message.redelivered = True
        super()._deliver(consumer, message)

    async def publish(self, exchange, routing_key, body, headers=None):
        if self.armed and exchange == topology.TASKS_EXCHANGE:
            self.armed = False
            self.lose_node(0.05)
            raise PublishOutcomeUnknown("connection lost before the copy was confirmed")
        await super().publish(exchange, routing_key, body, headers)


def test_copies_lost_with_the_connection_are_published_again(tmp_path, monkeypatch):
    """The prefetch drops and three waiting tasks go back as copies; the connection goes as
    the first copy is published, and the broker keeps the originals out of the queue. Each
    given-back task must still be in the queue once the worker is connected again, as a
    copy another worker takes as a first delivery; nacked back on the lost channel instead,
    they would be nowhere until the gone node returned."""
    monkeypatch.setattr(harness, "MemoryBroker", NodeLosingBroker)

    async def body():
        async with four_long_tasks_held(tmp_path, 4) as (parts, supervisor):
            await until(lambda: len(supervisor._unsettled) == 4, "four deliveries held")
            waiting = {delivery.body for handler, delivery in supervisor._unsettled.items()
                       if handler in supervisor._waiting}
            parts.broker.armed = True
            supervisor._release_excess(1)
            await until(lambda: parts.broker.queue_depth(WORK_QUEUE) >= 3, "three copies in the queue")
            queued = list(parts.broker._queues[WORK_QUEUE])
            return waiting, queued

    waiting, queued = run(body)
    assert len(waiting) == 3
    assert {message.body for message in queued} == waiting
    assert [message.redelivered for message in queued] == [False, False, False]


async def drain_while_the_node_is_away(tmp_path, broker, away_s: float):
    """Four 30 s tasks held by a one-child worker (one runs, three wait); the node goes away
    for `away_s` and the worker drains meanwhile (drain timeout 0.2 s: the running one is
    cut short). Returns (the four bodies, the work queue's messages once the drain is over)."""
    async with four_long_tasks_held(tmp_path, 4) as (parts, supervisor):
        assert parts.broker is broker
        # one runs (a suspect once its start is confirmed), three wait
        await until(lambda: len(supervisor._unsettled) == 4 and len(supervisor._waiting) == 3, "one run")
        held = {delivery.body for delivery in supervisor._unsettled.values()}
        broker.lose_node(away_s)
        await within(supervisor.stop(drain_timeout_s=0.2), HELD_BOUND_S)
        return held, list(broker._queues[WORK_QUEUE])


@pytest.mark.parametrize("redelivered", [False, True], ids=["first-deliveries", "redelivered"])
def test_a_drain_after_a_cluster_node_went_away_returns_every_task_it_held(tmp_path, monkeypatch, redelivered):
    """A node of the cluster goes away with the worker's four tasks and keeps them; the
    worker drains (SIGTERM) while it is away, longer than a drain waits for copies at
    first. Once the drain is over every task must be back in the queue: the three waiting
    and the one cut short by the drain timeout, as copies published once the worker
    reached a node again. Redelivered ones (each may have killed a worker) stay suspects.
    Nacked on the gone channel (redelivered ones), or left unpublished when the drain gave
    up on its copies, they would be nowhere until the node returned."""
    broker = NodeLosingBroker(nodes=2, redeliver=redelivered)
    monkeypatch.setattr(harness, "MemoryBroker", lambda: broker)
    monkeypatch.setattr(supervisor_module, "REPUBLISH_WAIT_S", 0.1)
    held, queued = run(drain_while_the_node_is_away, tmp_path, broker, 1.0)
    assert len(held) == 4
    assert sorted(message.body for message in queued) == sorted(held)
    suspects = sorted(Header.SUSPECT in message.headers for message in queued)
    assert suspects == ([True] * 4 if redelivered else [False, False, False, True])  # the cut-short one


def test_a_drain_names_the_tasks_it_leaves_to_a_node_that_stays_away(tmp_path, monkeypatch, caplog):
    """The cluster stays away for longer than a drain waits for its copies: the worker
    stops all the same, and says which tasks only the gone node can give back."""
    broker = NodeLosingBroker(nodes=2, redeliver=False)
    monkeypatch.setattr(harness, "MemoryBroker", lambda: broker)
    monkeypatch.setattr(supervisor_module, "REPUBLISH_WAIT_S", 0.1)
    monkeypatch.setattr(supervisor_module, "ONLY_COPIES_WAIT_S", 0.3)
    with caplog.at_level("INFO", logger="qm.worker.supervisor"):
        # away for longer than the whole test may take: nothing but the bound ends the wait
        held, queued = run(drain_while_the_node_is_away, tmp_path, broker, 10 * HELD_BOUND_S)
    assert queued == []
    named = re.search(r"stopping with 4 task\(s\) not taken back \(([^)]*)\)", caplog.text)
    assert named, caplog.text
    assert len(set(named.group(1).split(", "))) == 4


def test_a_drain_after_the_only_node_restarted_publishes_no_copy(tmp_path, monkeypatch):
    """With one node, what the lost channel held comes back when the node does: a copy of
    each would run each task twice. After the drain the queue holds the four originals,
    back from the broker, and nothing else."""
    broker = NodeLosingBroker(nodes=1, redeliver=False)
    monkeypatch.setattr(harness, "MemoryBroker", lambda: broker)
    held, queued = run(drain_while_the_node_is_away, tmp_path, broker, 0.2)
    assert sorted(message.body for message in queued) == sorted(held)
    assert [message.redelivered for message in queued] == [True] * 4
    assert not any(Header.SUSPECT in message.headers for message in queued)
