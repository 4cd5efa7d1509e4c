"""load/bench_side_by_side.py in its quickest mode, on the shared RabbitMQ node: every task
QueueMaster, Dramatiq and Celery run must end with the right result, and the table must
have a number in every cell that applies. Correctness only; its numbers belong in
load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import pathlib
import sys

import pytest

from tests.processes import run_bounded, unique

BENCH = pathlib.Path(__file__).resolve().parents[2] / "load" / "bench_side_by_side.py"
RUN_TIMEOUT_S = 240
COLUMNS = ["Dramatiq", "Dramatiq, confirm_delivery", "Celery", "QueueMaster"]
#: Rows whose only number is QueueMaster's (the others have no batch submit and no server).
QUEUEMASTER_ONLY = ("through submit_many", "of which qm-server", "all processes, submit_many")
#: Rows measured once per system: not again for Dramatiq with confirms.
PER_SYSTEM = ("round trip", "CPU-bound")
NONE = ("—", "?")


@pytest.mark.rabbitmq
def test_side_by_side_benchmark_runs_every_task_of_every_system_to_its_right_result(rabbitmq):
    result = run_bounded([sys.executable, str(BENCH), "--quick", "--broker-url", rabbitmq.url,
                          "--queue", unique("bench")], RUN_TIMEOUT_S)
    context = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, context
    assert "FAILED" not in result.stdout, context
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header[1:] == COLUMNS, context
    assert len(body) == 13, context
    for name, dramatiq, confirmed, celery, queuemaster in body:
        assert queuemaster not in NONE, name
        if any(part in name for part in QUEUEMASTER_ONLY):
            assert dramatiq == confirmed == celery == "—", name
        elif any(part in name for part in PER_SYSTEM):
            assert dramatiq not in NONE and celery not in NONE and confirmed == "—", name
        else:
            assert not {dramatiq, confirmed, celery} & set(NONE), name
