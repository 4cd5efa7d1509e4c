"""load/bench_store.py and load/soak_store.py, tiny, on the shared RabbitMQ node: they must
run to the end and report every task they submitted as SUCCEEDED with the right result.
Correctness only; their numbers are for load/README.md, not for asserts on a busy machine.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.processes import run_bounded

LOAD = pathlib.Path(__file__).resolve().parent.parent.parent / "load"
RUN_TIMEOUT_S = 120


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run a load/ script, bounded; on timeout nothing it started is left running."""
    return run_bounded([sys.executable, str(LOAD / name), *args], RUN_TIMEOUT_S)


@pytest.mark.rabbitmq
def test_store_benchmark_fills_a_store_and_runs_every_task_through_a_server_on_it(rabbitmq, tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench_store.py", "--sizes", "300", "--tasks", "40", "--threads", "4",
                        "--store-ops", "50", "--repeat", "1", "--broker-url", rabbitmq.url, "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    [size] = json.loads(out.read_text())["sizes"]
    assert size["size"] == 300
    end_to_end = size["end_to_end"]
    assert end_to_end["tasks"] == 40 and end_to_end["states"] == {"SUCCEEDED": 40}, end_to_end
    assert end_to_end["wrong_results"] == 0 and not end_to_end["submit_errors"]
    in_process = size["in_process"]
    assert in_process["find_key"]["calls"] == 50 and in_process["apply"]["events"] == 100


@pytest.mark.rabbitmq
def test_store_soak_runs_its_rounds_on_one_growing_store(rabbitmq, tmp_path):
    out = tmp_path / "soak.json"
    result = run_script("soak_store.py", "--rounds", "2", "--tasks-per-round", "30", "--threads", "4",
                        "--warmup", "5", "--broker-url", rabbitmq.url, "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads(out.read_text())
    assert report["tasks"] == 60 and report["not_succeeded"] == 0 and report["wrong_results"] == 0, report
    first, second = report["rounds"]
    assert first["control"]["tasks"] == second["control"]["tasks"] == 30
    # 1 + 5 warm-up tasks, then + 30 of round 0, + 1 + 30 of its control (every server applies every event)
    assert (first["stored_before"], second["stored_before"]) == (6, 67)
    assert report["wal_bytes_max"] > 0
