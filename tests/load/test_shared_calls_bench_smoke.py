"""load/bench_shared_calls.py in its quickest mode, on the shared RabbitMQ node: every task
it submits, with submit sharing on and off, must end SUCCEEDED with the right result, and
its table must have a row for each way both ways. Correctness only; its numbers belong in
load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import pathlib
import sys

import pytest

from tests.processes import run_bounded, unique

BENCH = pathlib.Path(__file__).resolve().parents[2] / "load" / "bench_shared_calls.py"
RUN_TIMEOUT_S = 240


@pytest.mark.rabbitmq
def test_shared_calls_benchmark_runs_every_task_to_its_right_result_both_ways(rabbitmq):
    result = run_bounded([sys.executable, str(BENCH), "--quick", "--broker-url", rabbitmq.url,
                          "--queue", unique("bench")], RUN_TIMEOUT_S)
    context = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, context
    assert "FAILED" not in result.stdout, context
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "tasks/s" not in line]
    ways = {tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in rows}
    assert ways == {(way, sharing) for way in ("gather", "aio submit_many", "4 threads")
                    for sharing in ("on", "off")}, context
