"""load/bench_groups.py in its quickest mode: it starts its own RabbitMQ, server and
worker, and every round's callback must see every member's result (exit 0) and print its
line with numbers. Correctness only; its numbers belong in load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import pathlib
import re
import sys

import pytest

from tests.processes import run_bounded

BENCH = pathlib.Path(__file__).resolve().parents[2] / "load" / "bench_groups.py"
RUN_TIMEOUT_S = 240


@pytest.mark.rabbitmq
def test_groups_benchmark_runs_and_its_callbacks_see_every_result(rabbitmq):  # the fixture: RabbitMQ is installed
    result = run_bounded([sys.executable, str(BENCH), "--members", "20", "--rounds", "1"], RUN_TIMEOUT_S)
    context = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, context
    assert re.search(r"round 0: 20 members: submit_many \d+ ms, submit_group \d+ ms; "
                     r"last member seen -> callback result \d+ ms$", result.stdout, re.M), context
