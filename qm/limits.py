"""Per-task time and memory limits: which value applies, decided in one place.

Server side (`resolve`): the submission's value, else the task type's default, else the
server's default; capped by the task type's maximum; and the time limit must stay below
RabbitMQ's consumer_timeout, because RabbitMQ closes the channel of a delivery unacked
for longer (and requeues everything on it). Worker side (`cap`): the worker's own caps
lower them further. The smallest limit that applies wins.
"""
from __future__ import annotations

import dataclasses
import math

from qm.errors import ValidationError
from qm.registry import TaskType


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_limit_mb: int = 0  # 0 = no memory limit


def _smallest(*values: float | None) -> float | None:
    present = [value for value in values if value]
    return min(present) if present else None


def resolve(task_type: TaskType, timeout_s: float, memory_limit_mb: int, *, default_timeout_s: float,
            default_memory_limit_mb: int, consumer_timeout_s: float) -> Limits:
    """The limits a submission runs under; ValidationError names the field at fault."""
    if not math.isfinite(timeout_s) or timeout_s < 0:
        raise ValidationError("timeout_s", f"must be a positive number of seconds, got {timeout_s}")
    timeout = timeout_s or task_type.default_timeout_s or default_timeout_s
    timeout = _smallest(timeout, task_type.max_timeout_s)
    if timeout >= consumer_timeout_s:
        raise ValidationError(
            "timeout_s", f"{timeout:g} s is not below RabbitMQ's consumer_timeout of {consumer_timeout_s:g} s: "
            "RabbitMQ would take the task away from its worker mid-run. Use a shorter timeout, or raise "
            "consumer_timeout in rabbitmq.conf and broker.consumer_timeout_s (QM_BROKER__CONSUMER_TIMEOUT_S) "
            "together")
    memory = memory_limit_mb or task_type.default_memory_limit_mb or default_memory_limit_mb
    memory = _smallest(memory, task_type.max_memory_limit_mb) or 0
    return Limits(timeout, int(memory))


def cap(limits: Limits, worker_timeout_s: float, worker_memory_limit_mb: int) -> Limits:
    """The limits after this worker's caps (0 = no cap)."""
    return Limits(_smallest(limits.timeout_s, worker_timeout_s) or 0.0,
                  int(_smallest(limits.memory_limit_mb, worker_memory_limit_mb) or 0))


def soft_timeout_s(timeout_s: float, grace_s: float) -> float:
    """When the task gets qm.SoftTimeout: `grace_s` before the hard limit, at most halfway;
    0 (never) when there is no grace or no time limit."""
    if grace_s <= 0 or timeout_s <= 0:
        return 0.0
    return timeout_s - min(grace_s, timeout_s / 2)
