"""The worker directory: who is out there, from the heartbeats on the server's own queue."""

from __future__ import annotations

import logging
import time
from typing import Callable

from qm.broker.base import Broker, Delivery
from qm.messages import Heartbeat

log = logging.getLogger(__name__)


class WorkerDirectory:
    """The last heartbeat of every worker heard from, and what that says of it."""

    def __init__(self, broker: Broker, lost_after_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.broker = broker
        self.lost_after_s = lost_after_s
        self.clock = clock
        self._workers: dict[str, tuple[Heartbeat, float]] = {}

    def on_heartbeat(self, delivery: Delivery) -> None:
        self.broker.ack(delivery)
        try:
            beat = Heartbeat.decode(delivery.body)
        except ValueError as exc:
            log.error("dropping an undecodable heartbeat: %s", exc)
            return
        self._workers[beat.worker_id] = (beat, self.clock())

    def list(self) -> list[tuple[Heartbeat, float, str]]:
        """Every worker heard from: its last heartbeat, when it arrived, and its state
        (active, draining, stopped, or lost: silent over `lost_after_s`)."""
        now = self.clock()
        listed = []
        for beat, seen_at in sorted(self._workers.values(), key=lambda item: item[0].worker_id):
            if beat.stopped:
                state = "stopped"
            elif now - seen_at > self.lost_after_s:
                state = "lost"
            else:
                state = "draining" if beat.draining else "active"
            listed.append((beat, seen_at, state))
        return listed

    def all_read(self, queue: str, feature: str) -> bool:
        """Whether there is a live worker (active or draining) consuming `queue` and every
        one names `feature` (protocol.Feature) in its heartbeat."""
        live = [
            beat for beat, _seen_at, state in self.list() if state in ("active", "draining") and queue in beat.queues
        ]
        return bool(live) and all(feature in beat.features for beat in live)

    def largest_procs(self, queue: str) -> int | None:
        """The most CPU slots (`--procs`) of a live worker (active or draining) consuming
        `queue`; None when no such worker is known (qm/server/fit.py)."""
        sizes = [
            beat.procs
            for beat, _seen_at, state in self.list()
            if state in ("active", "draining") and queue in beat.queues
        ]
        return max(sizes, default=None)
