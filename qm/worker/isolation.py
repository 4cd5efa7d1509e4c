"""Running suspect tasks alone: the worker-side half of poison containment.

A redelivered task may be what took its last worker down. If it runs next to others and
kills the worker again, they die with it, come back with it, and look like poison too.
So it waits until nothing else runs, and nothing else starts while it runs. Workers give
back unstarted deliveries as copies (`Supervisor._give_back`), so a redelivery means
its holder died or lost its connection, not that it returned the task on purpose.

Priorities (qm/priority.py) hold here too: a waiting suspect holds back only tasks of its
priority or lower, and of several waiting suspects the highest priority goes first. So a
worker restarted after a kill -9 still starts a high-priority task before the
low-priority ones it gets back redelivered.
"""

from __future__ import annotations

import asyncio

from qm.priority import DEFAULT_PRIORITY


class Isolation:
    """Suspect tasks (redelivered: their last holder may have died of them) run alone:
    one waits until nothing else runs, and nothing else starts while it runs."""

    def __init__(self) -> None:
        self.running = 0
        self.suspect_running = False
        self._suspects: list[int] = []  # priorities of the suspects waiting
        self._changed = asyncio.Event()

    @property
    def suspects_waiting(self) -> int:
        return len(self._suspects)

    def _may_enter(self, suspect: bool, priority: int) -> bool:
        if self.suspect_running:
            return False
        if suspect:
            return self.running == 0 and priority >= max(self._suspects)
        return all(waiting < priority for waiting in self._suspects)

    async def enter(self, suspect: bool, priority: int = DEFAULT_PRIORITY) -> None:
        if suspect:
            self._suspects.append(priority)
        try:
            if suspect:  # deliveries that came together (a restart, a reconnect) all register
                await asyncio.sleep(0)  # before the first is let in: the highest goes first
            while True:
                self._changed.clear()
                if self._may_enter(suspect, priority):
                    break
                await self._changed.wait()
        finally:
            if suspect:
                self._suspects.remove(priority)
                self._changed.set()  # normal tasks held back for this suspect re-check
        self.running += 1
        self.suspect_running = suspect

    def leave(self, suspect: bool) -> None:
        self.running -= 1
        if suspect:
            self.suspect_running = False
        self._changed.set()
