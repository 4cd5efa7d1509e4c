"""The supervisor's CPU scheduling policy: its wake-ups do not preempt running tasks.

Every reply of a child wakes the supervisor. Linux's fair scheduler lets a woken task that
has slept a lot (the supervisor) preempt the one on the CPU at once; on a host whose cores
all run tasks that is often the child that just replied and was about to start its next
task, which then waits out the supervisor's handling of the outcome. In
`load/bench_dispatch.py`'s 0.25 s phase that was most of a child's idle gap between two
tasks (p50 1.5 to 2 ms; 0.55 to 0.6 ms as SCHED_BATCH). A SCHED_BATCH thread does not
preempt on wake-up: it runs at once on a free core, else at the next scheduler tick
(1 to 4 ms), and keeps its fair share of CPU time. Processes inherit the policy (the
reset-on-fork flag resets only real-time ones), so each child takes back the policy the
worker was started with before it runs a task (`take_back`, from `child_main`).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def yield_to_tasks() -> int | None:
    """Make the calling thread SCHED_BATCH. Returns the policy it had, for the children to
    take back; None if left as it was: the platform has no SCHED_BATCH, or the worker was
    started with a policy other than the default (an operator's choice, kept)."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return None
    original = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    if original != os.SCHED_OTHER:
        return None
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError as exc:  # e.g. a seccomp profile that forbids it
        log.warning("could not run the supervisor as SCHED_BATCH (%s); its wake-ups may preempt tasks", exc)
        return None
    return original


def take_back(policy: int | None) -> None:
    """In a child: the worker's original policy (`yield_to_tasks`'s result), for its tasks."""
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:  # the tasks then run as SCHED_BATCH too: slower to wake, never wrong
        log.warning("could not give a child back its scheduling policy %d (%s)", policy, exc)
