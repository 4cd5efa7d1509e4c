"""The worker directory on a fake clock: a worker silent past the bound is listed as lost."""
from __future__ import annotations

from qm.broker.base import Delivery
from qm.broker.memory import MemoryBroker
from qm.messages import Heartbeat
from qm.server.workers import WorkerDirectory


def beat(worker_id: str, **fields) -> Delivery:
    heartbeat = Heartbeat(worker_id, "host", 1, 2, 0, ("default",), ("math",), "0.2.0", **fields)
    return Delivery(heartbeat.encode(), {}, False, 1, "tag", 0)


def test_workers_are_active_draining_stopped_or_lost_by_their_last_heartbeat():
    now = [1000.0]
    directory = WorkerDirectory(MemoryBroker(), lost_after_s=30.0, clock=lambda: now[0])
    directory.on_heartbeat(beat("a"))
    directory.on_heartbeat(beat("b", draining=True))
    directory.on_heartbeat(beat("c", stopped=True))
    assert [(b.worker_id, state) for b, _at, state in directory.list()] == [
        ("a", "active"), ("b", "draining"), ("c", "stopped")]
    now[0] += 31.0
    directory.on_heartbeat(beat("b", draining=True))  # b still speaks; a has been silent 31 s
    assert [(b.worker_id, state) for b, _at, state in directory.list()] == [
        ("a", "lost"), ("b", "draining"), ("c", "stopped")]
