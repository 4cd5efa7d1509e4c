"""Task lifecycle and the rule that makes duplicate or late events harmless.

    QUEUED → RUNNING → SUCCEEDED | FAILED | TIMED_OUT | MEMORY_EXCEEDED | CRASHED | CANCELLED
                  ↘ RETRYING → RUNNING (next attempt)

Events may arrive twice (at-least-once delivery) or out of order (a redelivered attempt
racing its own late event). `supersedes` orders them: terminal states are final, a later
attempt beats an earlier one, and within one attempt a state only moves forward.
"""
from __future__ import annotations

import enum

from qm._proto.qm.v1 import task_queue_pb2


class TaskState(enum.IntEnum):
    """Mirrors qm.v1.TaskState; values are the wire numbers, names drop the proto's
    TASK_STATE_ prefix (which protobuf enums need, their values sharing the package scope)."""

    QUEUED = task_queue_pb2.TASK_STATE_QUEUED
    RUNNING = task_queue_pb2.TASK_STATE_RUNNING
    RETRYING = task_queue_pb2.TASK_STATE_RETRYING
    SUCCEEDED = task_queue_pb2.TASK_STATE_SUCCEEDED
    FAILED = task_queue_pb2.TASK_STATE_FAILED
    TIMED_OUT = task_queue_pb2.TASK_STATE_TIMED_OUT
    MEMORY_EXCEEDED = task_queue_pb2.TASK_STATE_MEMORY_EXCEEDED
    CRASHED = task_queue_pb2.TASK_STATE_CRASHED
    CANCELLED = task_queue_pb2.TASK_STATE_CANCELLED

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


#: The prefix of qm.v1.TaskState value names.
PROTO_PREFIX = "TASK_STATE_"


def state_name(number: int) -> str:
    """The name of a wire TaskState number without the proto prefix: 4 → "SUCCEEDED";
    TASK_STATE_UNSPECIFIED (0) → "UNSPECIFIED". What users see (qm status, qm.Client)."""
    return task_queue_pb2.TaskState.Name(number).removeprefix(PROTO_PREFIX)


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
