"""Fault-injection suite: real qm-server / qm-worker / RabbitMQ processes, killed on purpose.

Run it alone with `pytest tests/faults -m faults -rA` (-rA shows each scenario's printed counts).
"""
from __future__ import annotations

import pytest


@pytest.fixture
def launcher(launcher):
    """Workers that log every attempt's outcome: the suite counts executions, and so
    duplicates, from those lines (support.executions), and a success logs at DEBUG."""
    launcher.worker_log_level = "DEBUG"
    return launcher


def pytest_terminal_summary(terminalreporter) -> None:
    """Each scenario's printed counts ("[faults] ..." lines), whatever its outcome (pytest
    shows captured output of passed tests only with -rA, of xfailed ones never)."""
    lines = []
    for outcome in ("passed", "failed", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call":
                continue
            for line in getattr(report, "capstdout", "").splitlines():
                if line.startswith("[faults]"):
                    lines.append(f"{outcome.upper():8} {line}")
    if lines:
        terminalreporter.write_sep("=", "fault-injection counts")
        for line in lines:
            terminalreporter.write_line(line[:600])
