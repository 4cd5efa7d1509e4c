"""Per-task time and memory limits: which value applies, decided in one place.

Server side (`resolve`): the submission's value, else the task type's default, else the
server's default; capped by the task type's maximum; and the time limit must stay below
RabbitMQ's consumer_timeout, because RabbitMQ closes the channel of a delivery unacked
for longer (and requeues everything on it). Worker side (`cap`): the worker's own caps
lower them further. The smallest limit that applies wins.

The time limit is the time the task gets: the hard kill comes at the limit, never
earlier. The soft timeout (when the task gets qm.SoftTimeout, to clean up) is a
separate, explicit setting, never derived from the limit: the submission's
`soft_timeout_s`, else the task type's; 0 = none (the default). A submitted one must be
below the effective time limit (ValidationError naming `soft_timeout_s`); a task type's
default that is not below the limit a submission (or a worker's cap) brings it down to is
simply not armed: the hard limit comes first, and it is the one the task was given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from qm.errors import ValidationError
from qm.registry import TaskType


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_limit_mb: int = 0  # 0 = no memory limit
    soft_timeout_s: float = 0.0  # when the task gets qm.SoftTimeout; 0 = never; always < timeout_s


_N = TypeVar("_N", int, float)


def _smallest(*values: _N | None) -> _N | None:
    present = [value for value in values if value]
    return min(present) if present else None


def _armed(soft_timeout_s: float, timeout_s: float) -> float:
    """A soft timeout that comes before the hard limit, else 0 (not armed)."""
    return soft_timeout_s if 0 < soft_timeout_s and (not timeout_s or soft_timeout_s < timeout_s) else 0.0


def resolve(
    task_type: TaskType,
    timeout_s: float,
    memory_limit_mb: int,
    *,
    default_timeout_s: float,
    default_memory_limit_mb: int,
    consumer_timeout_s: float,
    soft_timeout_s: float = 0.0,
    max_timeout_s: float = 0.0,
    max_memory_limit_mb: int = 0,
) -> Limits:
    """The limits a submission runs under; ValidationError names the field at fault.

    `max_timeout_s` / `max_memory_limit_mb` are the server's maxima (0 = none), capping
    like the type's; with a memory maximum, "no limit" becomes that maximum."""
    if not math.isfinite(timeout_s) or timeout_s < 0:
        raise ValidationError("timeout_s", f"must be a positive number of seconds, got {timeout_s}")
    timeout: float | None = timeout_s or task_type.default_timeout_s or default_timeout_s
    timeout = _smallest(timeout, task_type.max_timeout_s, max_timeout_s)
    assert timeout is not None  # default_timeout_s > 0 (config), so one of them is set
    if timeout >= consumer_timeout_s:
        raise ValidationError(
            "timeout_s",
            f"{timeout:g} s is not below RabbitMQ's consumer_timeout of {consumer_timeout_s:g} s: "
            "RabbitMQ would take the task away from its worker mid-run. Use a shorter timeout, or raise "
            "consumer_timeout in rabbitmq.conf and broker.consumer_timeout_s (QM_BROKER__CONSUMER_TIMEOUT_S) "
            "together",
        )
    memory = memory_limit_mb or task_type.default_memory_limit_mb or default_memory_limit_mb
    memory = _smallest(memory, task_type.max_memory_limit_mb, max_memory_limit_mb) or 0
    if not math.isfinite(soft_timeout_s) or soft_timeout_s < 0:
        raise ValidationError("soft_timeout_s", f"must be a positive number of seconds, got {soft_timeout_s}")
    if soft_timeout_s and soft_timeout_s >= timeout:
        raise ValidationError(
            "soft_timeout_s",
            f"{soft_timeout_s:g} s is not below the task's time limit of {timeout:g} s: "
            "qm.SoftTimeout would never come before the hard kill. Use a shorter soft timeout, or a longer "
            "timeout_s",
        )
    soft = _armed(soft_timeout_s or task_type.soft_timeout_s or 0.0, timeout)
    return Limits(timeout, int(memory), soft)


def cap(limits: Limits, worker_timeout_s: float, worker_memory_limit_mb: int) -> Limits:
    """The limits after this worker's caps (0 = no cap). A soft timeout the capped time
    limit no longer leaves room for is not armed."""
    timeout = _smallest(limits.timeout_s, worker_timeout_s) or 0.0
    return Limits(
        timeout,
        int(_smallest(limits.memory_limit_mb, worker_memory_limit_mb) or 0),
        _armed(limits.soft_timeout_s, timeout),
    )
