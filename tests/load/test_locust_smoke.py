"""A short headless Locust run (load/locustfile.py) against a real stack: qm-server and a
qm-worker from the test harness on the shared RabbitMQ node. It must end with exit code 0
and no failure in any entry: the SubmitTask RPC and each task type end to end.

Locust is a test dependency; without it a local run skips, under CI=true it fails.
Locust is never imported here: importing it monkey-patches this process with gevent.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest

from tests.requirements import missing

from tests.processes import BIN_DIR, clean_env

LOCUSTFILE = os.path.join(os.path.dirname(__file__), "..", "..", "load", "locustfile.py")
TASK_TYPES = {"math", "examples.primes", "examples.hash_chain"}
RUN_TIME_S = 10
USERS = 4


def _locust() -> str:
    path = BIN_DIR / "locust"
    if importlib.util.find_spec("locust") is None or not os.access(path, os.X_OK):
        missing("locust is not installed (pip install locust; it is in the test extras)")
    return str(path)


@pytest.mark.rabbitmq
def test_headless_locust_run_has_no_failures(stack, tmp_path):
    locust = _locust()
    stats = tmp_path / "stats"
    env = {key: value for key, value in clean_env().items() if not key.startswith("LOCUST_")}
    # cwd=tmp_path: no locust.conf or pyproject.toml [tool.locust] of the repo applies.
    result = subprocess.run(
        [locust, "-f", os.path.abspath(LOCUSTFILE), "--headless", "-u", str(USERS), "-r", str(USERS),
         "-t", f"{RUN_TIME_S}s", "--stop-timeout", "10", "--host", stack.server.address,
         "--qm-queue", stack.queue, "--qm-task-timeout", "30", "--json-file", str(stats),
         "--exit-code-on-error", "1", "--only-summary", "--loglevel", "WARNING"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIME_S + 90,
        stdin=subprocess.DEVNULL)
    output = f"--- locust stdout ---\n{result.stdout}\n--- locust stderr ---\n{result.stderr}"
    assert result.returncode == 0, output

    # The JSON file holds the final numbers (the CSV files are written periodically).
    entries = {(e["method"], e["name"]): e for e in json.loads(stats.with_suffix(".json").read_text())}
    failed = {key: e["num_failures"] for key, e in entries.items() if e["num_failures"]}
    assert not failed, f"failures {failed}\n{output}"
    submits = entries[("grpc", "SubmitTask")]["num_requests"]
    tasks = {name: e["num_requests"] for (method, name), e in entries.items() if method == "task"}
    assert set(tasks) <= TASK_TYPES, tasks
    assert submits >= 10 and sum(tasks.values()) >= 10, (submits, tasks, output)
    # Every submitted task was followed to its end (at most one per user in flight at the stop).
    assert submits - USERS <= sum(tasks.values()) <= submits, (submits, tasks)
    if sum(tasks.values()) >= 50:  # the mix is 3:1:1; at 50 tasks missing a type is ~1e-5
        assert set(tasks) == TASK_TYPES, tasks
