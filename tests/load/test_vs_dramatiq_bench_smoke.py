"""load/bench_vs_dramatiq.py in its quickest mode, on the shared RabbitMQ node: every task
both systems run must end with the right result, and the side-by-side table must have a
number in every cell that applies. Correctness only; its numbers belong in load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import pathlib
import sys

import pytest

from tests.processes import run_bounded, unique

BENCH = pathlib.Path(__file__).resolve().parents[2] / "load" / "bench_vs_dramatiq.py"
RUN_TIMEOUT_S = 240
#: Rows whose only number is QueueMaster's (Dramatiq has no batch submit and no server).
QUEUEMASTER_ONLY = ("through submit_many", "of which qm-server", "all processes, submit_many")
#: Rows measured with Dramatiq's default broker only (not again with confirms).
NOT_WITH_CONFIRMS = ("round trip", "CPU-bound")


@pytest.mark.rabbitmq
def test_side_by_side_benchmark_runs_every_task_of_both_systems_to_its_right_result(rabbitmq):
    result = run_bounded([sys.executable, str(BENCH), "--quick", "--broker-url", rabbitmq.url,
                          "--queue", unique("bench")], RUN_TIMEOUT_S)
    context = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, context
    assert "FAILED" not in result.stdout, context
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [cell.strip() for cell in header[1:]] == ["Dramatiq", "Dramatiq, confirm_delivery", "QueueMaster"]
    assert len(body) == 13, context
    for name, *cells in body:
        dramatiq, confirmed, queuemaster = (cell.strip() for cell in cells[:3])
        assert queuemaster not in ("—", "?"), name
        if any(part in name for part in QUEUEMASTER_ONLY):
            assert dramatiq == confirmed == "—", name
        elif any(part in name for part in NOT_WITH_CONFIRMS):
            assert dramatiq not in ("—", "?") and confirmed == "—", name
        else:
            assert "?" not in (dramatiq, confirmed) and "—" not in (dramatiq, confirmed), name
