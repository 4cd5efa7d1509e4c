"""Fire-and-forget coroutines that are still owned: kept until done, awaited on stop."""

from __future__ import annotations

import asyncio
from typing import Coroutine


class Background:
    """A set of tasks a component started and must not lose track of."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coroutine: Coroutine, name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self, timeout_s: float | None = None) -> None:
        """Wait up to `timeout_s` for what is still running."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def __len__(self) -> int:
        return len(self._tasks)
