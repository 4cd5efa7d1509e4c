"""Short headless Locust runs (load/locustfile.py) against a real stack: qm-server and a
qm-worker from the test harness on the shared RabbitMQ node. A run must end with exit code
0 and no failure in any entry: the SubmitTask RPC and each task type end to end; and the
options load/README.md documents do what it says.

Locust is a test dependency; without it a local run skips, under CI=true it fails.
Locust is never imported here: importing it monkey-patches this process with gevent.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest

from tests.processes import BIN_DIR, clean_env
from tests.requirements import missing

LOCUSTFILE = os.path.join(os.path.dirname(__file__), "..", "..", "load", "locustfile.py")
TASK_TYPES = {"math", "examples.primes", "examples.hash_chain"}
RUN_TIME_S = 10
USERS = 4


def _locust() -> str:
    path = BIN_DIR / "locust"
    if importlib.util.find_spec("locust") is None or not os.access(path, os.X_OK):
        missing("locust is not installed (pip install locust; it is in the test extras)")
    return str(path)


def run_locust(tmp_path, *args: str, env: dict[str, str] | None = None,
               run_time_s: int = RUN_TIME_S) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Run load/locustfile.py headless for run_time_s with these extra arguments; the
    process, the final statistics by (method, name), and its output for messages."""
    locust = _locust()
    stats = tmp_path / "stats"
    clean = {key: value for key, value in clean_env().items() if not key.startswith("LOCUST_")}
    # cwd=tmp_path: no locust.conf or pyproject.toml [tool.locust] of the repo applies.
    result = subprocess.run(
        [locust, "-f", os.path.abspath(LOCUSTFILE), "--headless", "-t", f"{run_time_s}s",
         "--json-file", str(stats), "--exit-code-on-error", "1", "--only-summary", "--loglevel", "WARNING",
         *args],
        cwd=tmp_path, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=run_time_s + 90,
        stdin=subprocess.DEVNULL)
    output = f"--- locust stdout ---\n{result.stdout}\n--- locust stderr ---\n{result.stderr}"
    # The JSON file holds the final numbers (the CSV files are written periodically).
    entries = {(e["method"], e["name"]): e for e in json.loads(stats.with_suffix(".json").read_text())}
    return result, entries, output


@pytest.mark.rabbitmq
def test_headless_locust_run_has_no_failures(stack, tmp_path):
    result, entries, output = run_locust(
        tmp_path, "-u", str(USERS), "-r", str(USERS), "--stop-timeout", "10", "--host", stack.server.address,
        "--qm-queue", stack.queue, "--qm-task-timeout", "30")
    assert result.returncode == 0, output

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


@pytest.mark.rabbitmq
def test_options_from_the_environment_choose_server_queue_types_and_think_time(stack, tmp_path):
    """load/README.md: each --qm-* option also comes from LOCUST_QM_*, and without --host the
    server is $QM_CLIENT__SERVER (a grpc:// prefix accepted). Only math, on the test's queue
    (a task on another queue would never end), each user thinking 10 min after its first
    task: exactly one task per user in the run."""
    env = {"QM_CLIENT__SERVER": f"grpc://{stack.server.address}", "LOCUST_QM_QUEUE": stack.queue,
           "LOCUST_QM_TYPES": "math", "LOCUST_QM_WAIT": "600", "LOCUST_QM_TASK_TIMEOUT": "30"}
    result, entries, output = run_locust(tmp_path, "-u", str(USERS), "-r", str(USERS), "--stop-timeout", "30",
                                         env=env)

    assert result.returncode == 0, output
    assert {key: e["num_failures"] for key, e in entries.items() if e["num_failures"]} == {}, output
    tasks = {name: e["num_requests"] for (method, name), e in entries.items() if method == "task"}
    assert tasks == {"math": USERS}, (tasks, output)
    assert entries[("grpc", "SubmitTask")]["num_requests"] == USERS, output


@pytest.mark.rabbitmq
def test_a_task_not_terminal_within_the_task_timeout_is_a_failure(stack, launcher, tmp_path):
    """--qm-task-timeout: tasks on a queue no worker consumes never end; each counts as a
    failure of its task entry after 2 s, and --exit-code-on-error makes the exit code 1.
    The submits themselves succeed."""
    unserved = launcher.queue(stack.broker_url)
    result, entries, output = run_locust(
        tmp_path, "-u", "1", "-r", "1", "--host", stack.server.address, "--qm-queue", unserved,
        "--qm-types", "math", "--qm-task-timeout", "2", run_time_s=8)

    assert result.returncode == 1, output
    assert entries[("task", "math")]["num_failures"] >= 1, output
    assert entries[("task", "math")]["num_failures"] == entries[("task", "math")]["num_requests"], output
    assert entries[("grpc", "SubmitTask")]["num_failures"] == 0, output
