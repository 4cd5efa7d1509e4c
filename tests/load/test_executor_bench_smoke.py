"""load/bench_executor.py in its quickest mode, on the shared RabbitMQ node: every call it
makes through qm.Executor (submit one by one, and map) must return its right result, and
its table must have every row with a number. Correctness only; the numbers belong in
load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import json
import pathlib
import sys

import pytest

from tests.processes import run_bounded

BENCH = pathlib.Path(__file__).resolve().parents[2] / "load" / "bench_executor.py"
RUN_TIMEOUT_S = 240


@pytest.mark.rabbitmq
def test_executor_benchmark_runs_every_call_to_its_right_result_and_prints_every_row(rabbitmq, tmp_path):
    out = tmp_path / "bench.json"
    result = run_bounded([sys.executable, str(BENCH), "--quick", "--broker-url", rabbitmq.url,
                          "--json", str(out)], RUN_TIMEOUT_S)
    context = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, context
    report = json.loads(out.read_text())
    assert report["failures"] == [], context
    [run] = report["runs"]
    assert run["submit"]["wrong"] == run["map"]["wrong"] == 0, run
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "calls/s" in line]
    assert len(rows) == 3, context
    assert all(row.split("|")[2].strip()[0].isdigit() for row in rows), context
