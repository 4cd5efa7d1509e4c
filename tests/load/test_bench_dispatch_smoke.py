"""load/bench_dispatch.py in its quickest mode, on the shared RabbitMQ node: every task it
submits must end SUCCEEDED with the right result (math "1 + 2 * 5" = 11; test.spin_timed
its child's pid and time stamps), and its table
must have every row, each with a number. Correctness only; its numbers belong in
load/README.md, not in asserts on a busy machine.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

from tests.processes import run_bounded, unique

BENCH = pathlib.Path(__file__).resolve().parents[2] / "load" / "bench_dispatch.py"
RUN_TIMEOUT_S = 240


def _bench_module():
    spec = importlib.util.spec_from_file_location("qm_load_bench_dispatch", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.rabbitmq
def test_dispatch_benchmark_runs_every_task_to_its_right_result_and_prints_every_row(rabbitmq, tmp_path):
    out = tmp_path / "bench.json"
    result = run_bounded([sys.executable, str(BENCH), "--quick", "--broker-url", rabbitmq.url,
                          "--queue", unique("bench"), "--json", str(out)], RUN_TIMEOUT_S)
    context = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, context
    report = json.loads(out.read_text())
    assert report["failures"] == [], context
    [run] = report["runs"]
    quick = {"e2e_submit": 30, "e2e_submit_many": 30, "e2e_aio_gather": 30, "e2e_aio_submit_many": 30,
             "round_trip": 10, "cpu_bound": 4}
    for phase, count in quick.items():
        check = run[phase]["check"]
        assert check["seen"] == check["succeeded_right"] == count, (phase, check)
        assert check["states"] == {"SUCCEEDED": count}, (phase, check)
    assert run["cpu_bound"]["child_gaps"] >= 1, run["cpu_bound"]  # 4 tasks on 2 children: a child ran 2
    assert run["idle_processes"]["host_processes"] >= 20, run["idle_processes"]

    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in result.stdout.splitlines() if line.startswith("| ")}
    for label, *_ in _bench_module().ROWS:
        assert label in rows, f"row {label!r} missing\n{context}"
        assert rows[label] not in ("", "n/a"), f"row {label!r} has no number\n{context}"
