"""The jobs a worker holds that no child has yet, highest priority first (qm/priority.py).

A worker consumes every priority band of its queues, each with its own prefetch, so it may
hold deliveries of several priorities at once. The next free child takes the job of the
highest priority, the oldest of that priority first: a burst of low-priority deliveries
held here never runs ahead of a high-priority one that arrives after it. A task of
higher priority waits at most for the tasks the children are already running (and, while
tasks are short and pipelined, the one each busy child holds next: qm/worker/pool.py).

A drop-in for the pool's deque of waiting jobs: append, appendleft (first in line among
its priority: a job a dying child never started), first (the head, left in line), popleft,
remove, `in`, len.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Generic, TypeVar

from qm.messages import TaskMessage
from qm.priority import DEFAULT_PRIORITY

T = TypeVar("T")


class ReadyJobs(Generic[T]):
    """Items ordered by (priority high to low, arrival); `priority_of` reads an item's."""

    def __init__(self, priority_of: Callable[[T], int]) -> None:
        self._priority_of = priority_of
        self._heap: list[tuple[int, int, int, T]] = []  # (-priority, order, id, item)
        self._later = itertools.count()  # append: after everything of its priority
        self._sooner = itertools.count(-1, -1)  # appendleft: before everything of its priority
        self._ids = itertools.count()  # ties never compare the items themselves

    def append(self, item: T) -> None:
        heapq.heappush(self._heap, (-self._priority_of(item), next(self._later), next(self._ids), item))

    def appendleft(self, item: T) -> None:
        heapq.heappush(self._heap, (-self._priority_of(item), next(self._sooner), next(self._ids), item))

    def first(self) -> T:
        """The item popleft would return, left in line."""
        if not self._heap:
            raise IndexError("first of an empty ReadyJobs")
        return self._heap[0][3]

    def popleft(self) -> T:
        """The item of the highest priority, the first in line of that priority."""
        if not self._heap:
            raise IndexError("pop from an empty ReadyJobs")
        return heapq.heappop(self._heap)[3]

    def remove(self, item: T) -> None:
        for index, entry in enumerate(self._heap):
            if entry[3] is item:
                self._heap[index] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError("item not waiting")

    def __contains__(self, item: object) -> bool:
        return any(entry[3] is item for entry in self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)


def priority_of_body(body: bytes) -> int:
    """A task message's priority (DEFAULT_PRIORITY for one that does not decode)."""
    try:
        return TaskMessage.decode(body).priority
    except ValueError:
        return DEFAULT_PRIORITY
