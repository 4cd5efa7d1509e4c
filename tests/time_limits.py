"""How long a task ran before its time limit ended it, from the status a user reads.

The product ends a task within about 50 ms of its limit (`load/bench_worker.py`
`timeout_accuracy` measures that). Tests run on loaded 2-core machines, so they assert a
looser bound that still fails when the limit is not enforced: a task spinning ten times
its limit must not run ten times its limit.

`started_at` is when a child took the task (the worker's RUNNING event) and `finished_at`
when its outcome was known (the terminal event), both stamped by the worker's clock.
"""
from __future__ import annotations

#: How late the end of a task past its time limit may be reported on a busy machine
#: (the kill, the sentinel, the dead-letter publish and its confirm).
LATE_S = 1.0
#: How early a hard kill may look (timer and clock granularity); nothing ends a task
#: that ignores signals before its limit.
EARLY_S = 0.05


def ran_s(status) -> float:
    assert status.started_at is not None and status.finished_at is not None, status
    return status.finished_at - status.started_at


def assert_ended_at_limit(status, limit_s: float, *, hard_kill: bool = False) -> None:
    """The task ended no later than its limit (+ LATE_S). With hard_kill (a task that
    ignores every signal, or a worker without soft timeout) also not before the limit: the
    time a task gets is its limit. Without it the task may end early, at its soft timeout."""
    ran = ran_s(status)
    assert ran <= limit_s + LATE_S, (
        f"task {status.task_id} ran {ran:.3f} s with a time limit of {limit_s:g} s: the limit was not "
        f"enforced in time ({status.state}: {status.error})")
    if hard_kill:
        assert ran >= limit_s - EARLY_S, (
            f"task {status.task_id} was killed after {ran:.3f} s, before its time limit of {limit_s:g} s")
