"""Fan-out of task record changes to the status streams following them (no polling)."""

from __future__ import annotations

import asyncio
import collections
from typing import Iterable

from qm.server.store_api import TaskRecord


class Hub:
    """task id → the queues of the streams following it."""

    def __init__(self) -> None:
        self._followers: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)

    def follow(self, task_id: str, updates: asyncio.Queue) -> None:
        self._followers[task_id].add(updates)

    def unfollow(self, task_id: str, updates: asyncio.Queue) -> None:
        followers = self._followers.get(task_id)
        if followers is not None:
            followers.discard(updates)
            if not followers:
                del self._followers[task_id]

    def publish(self, record: TaskRecord) -> None:
        for updates in self._followers.get(record.task_id, ()):
            updates.put_nowait(record)

    def following(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """The ids among `task_ids` (all, if None) that some stream follows."""
        if task_ids is None:
            return list(self._followers)
        return [task_id for task_id in task_ids if task_id in self._followers]

    @property
    def open_follows(self) -> int:
        return sum(len(followers) for followers in self._followers.values())
