"""When the servers hear that a run started (its RUNNING event).

A RUNNING event costs as much as the outcome event, so while runs are short the supervisor
announces a start only once the run has lasted `worker.running_event_delay_s`; a run that
ends sooner reports its start with its outcome instead (`TaskEvent.started_at`), one event
per task instead of two (docs/architecture.md, "Announcing a start").
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class StartAnnouncement:
    """One run's start, from when it starts until it is announced or the run ends."""

    def __init__(self, publish: Callable[[float], object]) -> None:
        self._publish = publish  # publish(started_at_s): the RUNNING event, dated at the start
        self._since_s: float | None = None  # wall clock at the start, while unannounced
        self._timer: asyncio.TimerHandle | None = None

    def start(self, delay_s: float | None) -> None:
        """The run starts now: announce it at once (`delay_s` None) or once it lasts `delay_s`."""
        self._since_s = time.time()
        if delay_s is None:
            self.announce()
        else:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self.announce)

    def announce(self) -> None:
        """Announce the start now, dated when it happened (once; nothing if already told)."""
        since_s = self.end()
        if since_s is not None:
            self._publish(since_s)

    def end(self) -> float | None:
        """No announcement after this. Returns the start still unannounced (its wall-clock
        time, for the outcome event to carry), or None."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        since_s, self._since_s = self._since_s, None
        return since_s
