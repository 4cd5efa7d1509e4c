"""Retry policy: which outcomes retry, after how long, through which wait queue.

Defaults (documented in docs/architecture.md and config/config.yaml): FAILED and
CRASHED retry while the budget lasts; TIMED_OUT only with `on_timeout`; MEMORY_EXCEEDED
never (it would blow up again), nor does CANCELLED. Task code may raise `qm.Retry` to ask
for a retry (with its own delay) or `qm.PermanentError` to fail without retrying.

Delays run inside RabbitMQ, never in a worker: the next attempt is published to the wait
queue of a fixed delay tier (`x-message-ttl` = the tier), whose dead-letter exchange is
`qm.tasks`; the message keeps its routing key (the logical queue), so when its TTL ends it
lands back on its work queue. One queue per tier, because a per-message TTL only expires
at the head of a queue: mixing delays in one queue would hold short ones behind long ones.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random

from qm.errors import ValidationError
from qm.registry import TaskType
from qm.states import TaskState

#: Wait-queue delay tiers, seconds. A requested delay runs in the longest tier not above it.
DELAY_TIERS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: States a retry may follow by default; TIMED_OUT joins with on_timeout.
RETRYABLE = frozenset({TaskState.FAILED, TaskState.CRASHED})
#: Largest retry budget accepted.
MAX_RETRIES_LIMIT = 100


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 0
    backoff_s: float = 1.0
    backoff_max_s: float = 300.0
    jitter: bool = True
    on_timeout: bool = False

    def covers(self, state: TaskState) -> bool:
        """Whether `state` is an outcome this policy retries (budget aside)."""
        return state in RETRYABLE or (self.on_timeout and state is TaskState.TIMED_OUT)

    def retries(self, state: TaskState, attempt: int) -> bool:
        """Whether attempt number `attempt`, ended in `state`, gets another one."""
        return attempt <= self.max_retries and self.covers(state)

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt `attempt + 1`: exponential, capped, optionally jittered."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        if self.jitter:
            delay *= (rng or random).uniform(0.5, 1.0)
        return delay


def tier_for(delay_s: float) -> int:
    """The delay tier (seconds) a delay runs in: the longest tier not above it, at least the first."""
    index = bisect.bisect_right(DELAY_TIERS_S, delay_s) - 1
    return DELAY_TIERS_S[max(0, index)]


def resolve(
    task_type: TaskType,
    default: RetryPolicy,
    *,
    max_retries: int | None = None,
    backoff_s: float | None = None,
    backoff_max_s: float | None = None,
    jitter: bool | None = None,
    on_timeout: bool | None = None,
) -> RetryPolicy:
    """The policy of one submission: its own values, else the task type's, else the server's."""
    base = task_type.retry or default
    policy = RetryPolicy(
        max_retries=base.max_retries if max_retries is None else max_retries,
        backoff_s=base.backoff_s if backoff_s is None else backoff_s,
        backoff_max_s=base.backoff_max_s if backoff_max_s is None else backoff_max_s,
        jitter=base.jitter if jitter is None else jitter,
        on_timeout=base.on_timeout if on_timeout is None else on_timeout,
    )
    if policy.max_retries > MAX_RETRIES_LIMIT:
        raise ValidationError("max_retries", f"{policy.max_retries} is more than {MAX_RETRIES_LIMIT}")
    for field in ("backoff_s", "backoff_max_s"):
        value = getattr(policy, field)
        if not math.isfinite(value) or value < 0:
            raise ValidationError(f"retry_{field}", f"must be a non-negative number of seconds, got {value}")
    return policy
