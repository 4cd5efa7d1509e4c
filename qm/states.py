"""Task lifecycle and the rule that makes duplicate or late events harmless.

    QUEUED → RUNNING → SUCCEEDED | FAILED | TIMED_OUT | MEMORY_EXCEEDED | CRASHED | CANCELLED
                  ↘ RETRYING → RUNNING (next attempt)

Events may arrive twice (at-least-once delivery) or out of order (a redelivered attempt
racing its own late event). `supersedes` orders them: terminal states are final, a later
attempt beats an earlier one, and within one attempt a state only moves forward.
"""
from __future__ import annotations

import enum

from qm._proto import task_queue_pb2


class TaskState(enum.IntEnum):
    """Mirrors qm.v1.TaskState; values are the wire numbers."""

    QUEUED = task_queue_pb2.QUEUED
    RUNNING = task_queue_pb2.RUNNING
    RETRYING = task_queue_pb2.RETRYING
    SUCCEEDED = task_queue_pb2.SUCCEEDED
    FAILED = task_queue_pb2.FAILED
    TIMED_OUT = task_queue_pb2.TIMED_OUT
    MEMORY_EXCEEDED = task_queue_pb2.MEMORY_EXCEEDED
    CRASHED = task_queue_pb2.CRASHED
    CANCELLED = task_queue_pb2.CANCELLED

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMED_OUT,
                             TaskState.MEMORY_EXCEEDED, TaskState.CRASHED, TaskState.CANCELLED})

#: Progress within one attempt; terminal states share the highest rank.
_RANK = {TaskState.QUEUED: 0, TaskState.RUNNING: 1, TaskState.RETRYING: 2}
_TERMINAL_RANK = 3


def _rank(state: TaskState) -> int:
    return _TERMINAL_RANK if state.terminal else _RANK[state]


def supersedes(current: TaskState, current_attempt: int, new: TaskState, new_attempt: int) -> bool:
    """Whether an event (new, new_attempt) should replace the stored (current, attempt)."""
    if current.terminal:
        return False
    if new.terminal:
        return True
    if new_attempt != current_attempt:
        return new_attempt > current_attempt
    return _rank(new) > _rank(current)
