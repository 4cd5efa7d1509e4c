"""The worker's summary of ended tasks: what an operator reads at INFO now that a
successful attempt logs at DEBUG."""
from __future__ import annotations

import logging

from qm.worker.tally import OutcomeTally

LOGGER = "test.tally"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


def test_ended_tasks_are_summed_up_once_a_minute_by_state(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    tally = OutcomeTally(logging.getLogger(LOGGER), interval_s=60.0, clock=clock)
    for _ in range(1500):
        tally.add("SUCCEEDED")
    tally.add("FAILED")
    clock.now_s += 30.0
    tally.add("SUCCEEDED")
    assert _lines(caplog) == []  # within the minute: nothing yet
    clock.now_s += 31.0
    tally.add("TIMED_OUT")
    assert _lines(caplog) == ["1,503 runs ended in the last 61 s: 1 FAILED, 1,501 SUCCEEDED, 1 TIMED_OUT"]


def test_stop_logs_the_last_part_of_a_minute_and_an_idle_worker_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    tally = OutcomeTally(logging.getLogger(LOGGER), interval_s=60.0, clock=clock)
    clock.now_s += 600.0
    tally.flush()
    assert _lines(caplog) == []
    tally.add("SUCCEEDED")
    clock.now_s += 5.0
    tally.flush()
    assert _lines(caplog) == ["1 run ended in the last 5 s: 1 SUCCEEDED"]
