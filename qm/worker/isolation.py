"""Running suspect tasks alone: the worker-side half of poison containment.

A redelivered task may be what took its last worker down. If it runs next to others and
kills the worker again, they die with it, come back with it, and look like poison too.
So it waits until nothing else runs, and nothing else starts while it runs. Workers give
back unstarted deliveries as copies (`Supervisor._give_back`), so a redelivery means
its holder died or lost its connection, not that it returned the task on purpose.
"""

from __future__ import annotations

import asyncio


class Isolation:
    """Suspect tasks (redelivered: their last holder may have died of them) run alone:
    one waits until nothing else runs, and nothing else starts while it runs."""

    def __init__(self) -> None:
        self.running = 0
        self.suspect_running = False
        self.suspects_waiting = 0
        self._changed = asyncio.Event()

    def _may_enter(self, suspect: bool) -> bool:
        if self.suspect_running:
            return False
        return self.running == 0 if suspect else self.suspects_waiting == 0

    async def enter(self, suspect: bool) -> None:
        self.suspects_waiting += suspect
        try:
            while True:
                self._changed.clear()
                if self._may_enter(suspect):
                    break
                await self._changed.wait()
        finally:
            self.suspects_waiting -= suspect
            if suspect:
                self._changed.set()  # normal tasks held back for this suspect re-check
        self.running += 1
        self.suspect_running = suspect

    def leave(self, suspect: bool) -> None:
        self.running -= 1
        if suspect:
            self.suspect_running = False
        self._changed.set()
