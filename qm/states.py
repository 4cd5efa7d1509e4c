"""Task lifecycle and the rule that makes duplicate or late events harmless.

    [SCHEDULED →] QUEUED → RUNNING → SUCCEEDED | FAILED | TIMED_OUT | MEMORY_EXCEEDED | CRASHED | CANCELLED
                                ↘ RETRYING → RUNNING (next attempt)

A SCHEDULED task (submitted with a delay) is stored as such until its first attempt
starts; the server shows it QUEUED once due (qm/scheduling.py `shown_state`).

Events may arrive twice (at-least-once delivery) or out of order (a redelivered attempt
racing its own late event). `supersedes` orders them: terminal states are final, a later
attempt beats an earlier one, and within one attempt a state only moves forward.
"""

from __future__ import annotations

import enum

from qm._proto.qm.v1 import task_queue_pb2


class TaskState(enum.StrEnum):
    """Mirrors qm.v1.TaskState. A str-enum: a state is its name without the proto's
    TASK_STATE_ prefix (which protobuf enums need, their values sharing the package scope),
    so it prints, compares (`state == "SUCCEEDED"`) and dumps to JSON as that name, as
    users see it in `qm status` and on qm.Client. `int(state)` is its wire number (what
    protos and the store hold); `TaskState.of_number(number)` (or `TaskState(number)`)
    takes one back."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    MEMORY_EXCEEDED = "MEMORY_EXCEEDED"
    CRASHED = "CRASHED"
    CANCELLED = "CANCELLED"
    SCHEDULED = "SCHEDULED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    def __int__(self) -> int:
        return _NUMBER_OF[self]

    @classmethod
    def of_number(cls, number: int) -> TaskState:
        """The state of a wire number: 4 → SUCCEEDED; ValueError for one without a state
        (TASK_STATE_UNSPECIFIED, or a state newer than this code)."""
        try:
            return _STATE_OF[number]
        except KeyError:
            raise ValueError(f"{number!r} is not a valid {cls.__name__} number") from None

    @classmethod
    def _missing_(cls, value: object) -> TaskState | None:
        """TaskState(4) → SUCCEEDED: a wire number (an int, not a bool) names its state."""
        if isinstance(value, int) and not isinstance(value, bool):
            return _STATE_OF.get(value)
        return None

    def __conform__(self, protocol: object) -> int | None:
        """sqlite3 stores a state as its wire number (the store's INTEGER columns)."""
        import sqlite3  # already loaded: only sqlite3 calls this with its protocol

        return int(self) if protocol is sqlite3.PrepareProtocol else None


#: The prefix of qm.v1.TaskState value names.
PROTO_PREFIX = "TASK_STATE_"

_NUMBER_OF = {state: task_queue_pb2.TaskState.Value(PROTO_PREFIX + state.value) for state in TaskState}
_STATE_OF = {number: state for state, number in _NUMBER_OF.items()}


def state_name(number: int) -> str:
    """The name of a wire TaskState number without the proto prefix: 4 → "SUCCEEDED";
    TASK_STATE_UNSPECIFIED (0) → "UNSPECIFIED". What users see (qm status, qm.Client)."""
    return task_queue_pb2.TaskState.Name(int(number)).removeprefix(PROTO_PREFIX)


TERMINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.TIMED_OUT,
        TaskState.MEMORY_EXCEEDED,
        TaskState.CRASHED,
        TaskState.CANCELLED,
    }
)

#: Progress within one attempt; terminal states share the highest rank.
_RANK = {TaskState.SCHEDULED: -1, TaskState.QUEUED: 0, TaskState.RUNNING: 1, TaskState.RETRYING: 2}
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
