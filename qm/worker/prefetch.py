"""Adaptive prefetch: how many unacked deliveries a worker asks RabbitMQ for.

Long tasks must not be hoarded: a delivery waiting in one worker's buffer behind a
10-minute task is a task another idle worker could be running (and its wait counts
toward RabbitMQ's consumer_timeout). Short tasks need a buffer so a child never waits a
broker round trip for its next task. So: one delivery per child while tasks are long,
more as they get shorter, judged from a moving average of observed run times, with
hysteresis so the value does not flap around a threshold. A single long run (over
LONG_TASK_S, also reported while the task still runs) drops it to one per child at once.
The run times are the children's own (from taking a job to replying), not what the
supervisor saw: on a busy host its wake-ups now and then added 10 to 30 ms to tasks of
0.1 ms, and a few of those in a row carried the average over a fast level's threshold.
"""

from __future__ import annotations

#: (deliveries per child, mean task time to move to this level from a slower one,
#:  mean task time to fall back to the slower one), from slowest to fastest. The fast
#: levels hold at most about 80 ms of work per child (4 x 20 ms, 16 x 5 ms). The 16 per
#: child of tiny tasks is for the broker: a task's outcome is acked after its event's
#: confirm, so a deeper window means bigger event packs and fewer acks per task (RabbitMQ's
#: CPU per task about halved, all processes' about -28 %: load/README.md, "Deeper prefetch for
#: tiny tasks").
LEVELS = ((1, None, None), (2, 0.5, 1.0), (4, 0.02, 0.04), (16, 0.005, 0.01))
#: Weight of the newest observation in the moving average.
EWMA_ALPHA = 0.2
#: A run this long (seconds; the slowest level's threshold) sets the average at once.
LONG_TASK_S = LEVELS[1][2]
#: While the mean task time is below this (seconds), each busy child also holds its next
#: task in its pipe and starts it the moment it finishes, without waiting for the
#: supervisor (qm/worker/pool.py `pipeline`). At most one task per child waits behind a
#: running one that way; a run past LONG_TASK_S sets the mean above this at once. It is
#: the mean below which the prefetch already holds a second delivery per child: the pipe
#: takes that one, nothing more from RabbitMQ. (It was 0.25 s, where tasks of about
#: 0.25 s flipped between a 0.45 ms and a 2 ms idle gap with the drift of the mean.)
PIPELINE_BELOW_S = LEVELS[1][1]


class AutoPrefetch:
    """Starts at one delivery per child (safe for long tasks) and adapts."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.level = 0
        self.mean_s: float | None = None

    @property
    def value(self) -> int:
        return self.procs * LEVELS[self.level][0]

    def observe(self, duration_s: float) -> int | None:
        """Record one task's run time; return the new prefetch if it changed."""
        if self.mean_s is None or duration_s > LONG_TASK_S:
            # One long task is enough to stop buffering: a delivery hoarded behind it costs
            # far more than a child briefly waiting for its next short task.
            self.mean_s = max(duration_s, self.mean_s or 0.0)
        else:
            self.mean_s = EWMA_ALPHA * duration_s + (1 - EWMA_ALPHA) * self.mean_s
        level = self.level
        while level + 1 < len(LEVELS) and self.mean_s < _threshold(LEVELS[level + 1][1]):
            level += 1
        while level > 0 and self.mean_s > _threshold(LEVELS[level][2]):
            level -= 1
        if level == self.level:
            return None
        self.level = level
        return self.value

    @property
    def short(self) -> bool:
        """Tasks are short enough for each busy child to hold its next one."""
        return self.mean_s is not None and self.mean_s < PIPELINE_BELOW_S


class FixedPrefetch:
    """`--prefetch N`: never changes."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.mean_s: float | None = None

    def observe(self, duration_s: float) -> int | None:
        return None

    @property
    def short(self) -> bool:
        """A fixed prefetch is the operator's call: no task waits in a child's pipe."""
        return False


def _threshold(value: float | None) -> float:
    """A level's enter/leave threshold; only the first level (never entered from below nor
    left downwards) has none."""
    assert value is not None
    return value
