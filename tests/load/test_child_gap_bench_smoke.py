"""load/bench_child_gap.py, tiny, on the shared RabbitMQ node: it must run to the end with
every task SUCCEEDED with its result, and report the idle gaps it saw from the worker's
qm_worker_child_idle_gap_seconds. Correctness only; its numbers are for load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import json

import pytest

from tests.load.test_store_bench_smoke import run_script


@pytest.mark.rabbitmq
def test_child_gap_benchmark_runs_every_task_and_reports_the_gaps(rabbitmq, tmp_path):
    out = tmp_path / "gap.json"
    result = run_script("bench_child_gap.py", "--trivial", "40", "--sleepy", "60", "--rounds", "1",
                        "--broker-url", rabbitmq.url, "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads(out.read_text())
    [trivial], [sleepy] = report["trivial"], report["sleepy 0.05 s"]
    assert (trivial["tasks"], sleepy["tasks"]) == (40, 60)
    # 60 tasks submitted at once to a ready worker: from its first known run time on, every
    # next task of a child was waiting, so its gap is measured
    assert 0 < sleepy["gaps_observed"] <= 60 - 2 and sleepy["gap_p50_ms"] is not None, sleepy
    assert trivial["supervisor_cpu_ms_per_task"] > 0
