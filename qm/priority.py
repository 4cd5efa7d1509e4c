"""Task priorities: 0-9, higher runs first, and the RabbitMQ bands they travel in.

Quorum queues (RabbitMQ 3.10) have no message priorities, so a logical queue is three
work queues, one per band, and a worker consumes all three (qm/broker/topology.py):

    priority 7-9  ──► qm.tasks.<queue>.p7   (high)
    priority 4-6  ──► qm.tasks.<queue>      (normal: the default 5; the name queues always had)
    priority 0-3  ──► qm.tasks.<queue>.p0   (low)

A worker holds few deliveries (its prefetch, per band) and hands its next free child the
highest priority it holds, by exact level (qm/worker/ready.py). So a task of a higher band
never waits behind a backlog of a lower one: at most behind the tasks the children are
already running. Within a band RabbitMQ keeps arrival order; a worker reorders only what it
holds. Three bands, not ten queues: each band is a replicated queue and a consumer with its
own prefetch on every worker, so ten would multiply what a worker may hold by ten.
"""

from __future__ import annotations

import argparse

from qm.errors import ValidationError

#: Highest priority; 0 is the lowest.
MAX_PRIORITY = 9
#: What a submission gets when neither it nor its task type sets one: the middle, so
#: background work can go below it and urgent work above.
DEFAULT_PRIORITY = 5
#: (lowest, highest) priority of each band, from high to low; the band holding the default
#: uses the plain work queue name.
BANDS = ((7, 9), (4, 6), (0, 3))


def band(priority: int) -> int:
    """The lowest priority of the band `priority` travels in (7, 4 or 0)."""
    for lowest, highest in BANDS:
        if lowest <= priority <= highest:
            return lowest
    raise ValueError(f"priority {priority} is outside 0-{MAX_PRIORITY}")


def suffix(priority: int) -> str:
    """What the band of `priority` adds to a work queue name and routing key ("" for the
    default band, else ".p<lowest of the band>")."""
    lowest = band(priority)
    return "" if lowest == band(DEFAULT_PRIORITY) else f".p{lowest}"


def band_priorities() -> tuple[int, ...]:
    """One priority of each band, high to low (for declaring and consuming every band)."""
    return tuple(lowest for lowest, _highest in BANDS)


def problem(priority: object) -> str | None:
    """Why `priority` is not a priority, or None."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        return f"must be a whole number from 0 (lowest) to {MAX_PRIORITY} (highest), got {priority!r}"
    return None


def resolve(requested: int | None, type_default: int | None) -> int:
    """A submission's priority: its own, else its task type's, else DEFAULT_PRIORITY;
    ValidationError naming `priority` for one out of range."""
    if requested is not None:
        why = problem(requested)
        if why is not None:
            raise ValidationError("priority", f"{why}; higher runs first, unset = the task type's default")
        return requested
    return DEFAULT_PRIORITY if type_default is None else type_default


def option_value(text: str) -> int:
    """A `--priority` value on a command line: a whole number 0-9 (argparse names the option
    in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PRIORITY:
        raise argparse.ArgumentTypeError(f"{text!r} is not a priority: use 0 (lowest) to {MAX_PRIORITY} (highest)")
    return value
