"""load/bench_scale.py, tiny, on the shared RabbitMQ node and a PostgreSQL of its own: it
must run every scenario to the end with every task SUCCEEDED, and show what the shared
store promises: each event applied once per store (the two servers' shares add up to the
one server's one outcome event per task), while SQLite replicas each apply every event.

Without rabbitmq-server or PostgreSQL a local run skips; under CI=true it fails.
"""
from __future__ import annotations

import json

import pytest

from tests.load.test_store_bench_smoke import run_script
from tests.postgres_fixtures import require_postgres

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


def test_scale_benchmark_runs_every_scenario_and_applies_each_event_once_per_store(rabbitmq, tmp_path):
    require_postgres()
    out = tmp_path / "scale.json"
    result = run_script("bench_scale.py", "--tasks", "30", "--rounds", "1", "--broker-url", rabbitmq.url,
                        "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    runs = {run["scenario"]: run for run in json.loads(out.read_text())}
    assert set(runs) == {"postgres x1", "postgres x2", "sqlite x2"}
    assert all(run["succeeded"] == run["tasks"] == 30 for run in runs.values()), runs
    assert runs["postgres x1"]["events_per_task_per_server"] == [1.0]
    assert sum(runs["postgres x2"]["events_per_task_per_server"]) == pytest.approx(1.0)
    assert runs["sqlite x2"]["events_per_task_per_server"] == [1.0, 1.0]
