"""The worker's INFO summary of the runs (attempts) that ended, at most one line a minute.

A successful attempt is logged at DEBUG only: at a thousand tiny tasks a second, a line
each took about a tenth of the supervisor's CPU (load/README.md, "A log line per task").
Every other outcome (failed, retried, timed out, killed, cancelled) keeps its INFO line.
This tally says at INFO how many runs ended, by the state each run ended in (a FAILED run
may still be retried), once `interval_s` has passed since its last line, when a run ends
(no timer: an idle worker logs nothing); `flush` at stop.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

#: Least time between two summary lines.
SUMMARY_INTERVAL_S = 60.0


class OutcomeTally:
    """Counts ended attempts by state; logs them together every `interval_s` at most."""

    def __init__(
        self,
        log: logging.Logger,
        interval_s: float = SUMMARY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._interval_s = interval_s
        self._clock = clock
        self._counts: collections.Counter[str] = collections.Counter()
        self._since_s = clock()

    def add(self, state_name: str) -> None:
        self._counts[state_name] += 1
        now_s = self._clock()
        if now_s - self._since_s >= self._interval_s:
            self.flush(now_s)

    def flush(self, now_s: float | None = None) -> None:
        """Log what was counted since the last line (nothing if none ended), and start over."""
        now_s = self._clock() if now_s is None else now_s
        if self._counts:
            by_state = ", ".join(f"{count:,} {state}" for state, count in sorted(self._counts.items()))
            total = self._counts.total()
            self._log.info(
                "%s run%s ended in the last %.0f s: %s",
                f"{total:,}",
                "" if total == 1 else "s",
                now_s - self._since_s,
                by_state,
            )
        self._counts.clear()
        self._since_s = now_s
