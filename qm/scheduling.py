"""Delayed tasks: when a submission is due, and how it waits for that in RabbitMQ.

    submit(delay_s | not_before) ──► qm.delay.<tier>s (quorum, TTL) ──► qm.tasks ──► work queue
                                           ▲                                            │
                                           └── worker: not_before still ahead? ◄────────┘
                                               publish to the tier that fits (confirmed), ack

The server publishes a delayed task to the delay tier (the quorum `qm.delay.<N>s` queues
retries wait in, qm/broker/topology.py) of the longest tier not above its delay; when the
tier's TTL ends, RabbitMQ dead-letters it to its work queue. The task message carries its
due time (`not_before`): a worker that gets it early sends it on to the tier that fits the
time left instead of running it. So a delay longer than the largest tier hops through
tiers, any publish of the task (the reconciler's, a restart's) is safe whenever it comes,
and the task never waits in a worker's memory. It is stored SCHEDULED with its due time
(the record's `next_attempt_at`) until its first attempt starts, and shown QUEUED once due.
"""

from __future__ import annotations

import dataclasses
import math

from qm import retry
from qm.errors import ValidationError
from qm.states import TaskState

#: Default of server.max_delay_s: the longest delay a submission may ask for. It may not
#: exceed how long the cancel stream keeps cancels (topology.CANCEL_STREAM_MAX_AGE, 7 days):
#: a worker must still know of a cancel when the task comes due.
DEFAULT_MAX_DELAY_S = 7 * 86400.0


@dataclasses.dataclass(frozen=True)
class Delay:
    """What a submission asked for: `delay_s` or `not_before_s` (epoch seconds); None = unset."""

    delay_s: float | None = None
    not_before_s: float | None = None

    def due_at(self, now_s: float, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> float | None:
        return due_at(self.delay_s, self.not_before_s, now_s, max_delay_s)


#: A submission to run now.
NO_DELAY = Delay()


def due_at(
    delay_s: float | None, not_before_s: float | None, now_s: float, max_delay_s: float = DEFAULT_MAX_DELAY_S
) -> float | None:
    """The time a submission is due, or None to run it now; ValidationError naming the field
    for both set, a negative or non-finite delay, or one over `max_delay_s`
    (server.max_delay_s). A `not_before` already past runs the task now."""
    if delay_s is not None and not_before_s is not None:
        raise ValidationError("delay_s", "set delay_s or not_before, not both")
    if delay_s is not None:
        if not math.isfinite(delay_s) or delay_s < 0:
            raise ValidationError("delay_s", f"must be a non-negative number of seconds, got {delay_s}")
        _check_within(max_delay_s, delay_s, "delay_s")
        return now_s + delay_s if delay_s > 0 else None
    if not_before_s is not None:
        if not math.isfinite(not_before_s):
            raise ValidationError("not_before", f"must be a time, got {not_before_s}")
        _check_within(max_delay_s, not_before_s - now_s, "not_before")
        return not_before_s if not_before_s > now_s else None
    return None


def _check_within(max_delay_s: float, wait_s: float, field: str) -> None:
    if wait_s > max_delay_s:
        raise ValidationError(
            field, f"{wait_s:.0f} s from now is more than the longest delay of {max_delay_s:.0f} s (server.max_delay_s)"
        )


def hop_tier_s(due_s: float | None, now_s: float) -> int | None:
    """The delay tier (seconds) a task due at `due_s` should wait in next, or None if it is
    due. The longest tier not above the time left, at least the first: a task never runs
    early (by the clock of the host that looks); it may run up to the first tier (1 s) late."""
    if due_s is None or due_s <= now_s:
        return None
    return retry.tier_for(due_s - now_s)


def shown_state(state: TaskState, due_s: float | None, now_s: float) -> TaskState:
    """The state users see: a SCHEDULED task whose due time has passed is QUEUED (it waits
    on its work queue for a worker)."""
    if state is TaskState.SCHEDULED and (due_s is None or due_s <= now_s):
        return TaskState.QUEUED
    return state
