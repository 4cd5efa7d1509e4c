"""load/bench_server_threads.py, tiny, on the shared RabbitMQ node: it must run to the end
and split the server's CPU by thread, the store's writer named among them, next to a bare
grpc.aio server's; with --worker, with the worker running the tasks and stopped.
Correctness only; its numbers are for load/README.md.

Without rabbitmq-server a local run skips; under CI=true it fails (tests/requirements.py).
"""
from __future__ import annotations

import json
import uuid

import pytest

from tests.load.test_store_bench_smoke import run_script


@pytest.mark.rabbitmq
def test_server_threads_benchmark_splits_the_servers_cpu_by_thread(rabbitmq, tmp_path):
    out = tmp_path / "threads.json"
    result = run_script("bench_server_threads.py", "--submits", "20", "--rounds", "1",
                        "--broker-url", rabbitmq.url, "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads(out.read_text())
    [submit], [echo] = report["submit"], report["grpc_echo"]
    # every submit commits on the store's writer thread and is answered from the loop
    assert submit["event loop_us"] > 0 and submit["store-writer_us"] > 0, submit
    assert submit["all_us"] >= submit["event loop_us"] + submit["store-writer_us"]
    assert echo["event loop_us"] > 0 and "store-writer_us" not in echo, echo
    assert "qm-server, SubmitTask" in result.stdout and "bare grpc.aio echo server" in result.stdout
    # the floors (bench_floor.py's server, no QueueMaster code): only the one with a store writes SQLite
    [publish], [store_publish] = report["floor_publish"], report["floor_store_publish"]
    assert publish["event loop_us"] > 0 and store_publish["event loop_us"] > 0
    assert "no QueueMaster code" in result.stdout


@pytest.mark.rabbitmq
def test_server_threads_benchmark_shows_what_running_the_tasks_adds(rabbitmq, tmp_path):
    out = tmp_path / "threads.json"
    queue = f"bench-threads-{uuid.uuid4().hex[:8]}"
    result = run_script("bench_server_threads.py", "--submits", "20", "--rounds", "1", "--worker",
                        "--queue", queue, "--broker-url", rabbitmq.url, "--json", str(out))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads(out.read_text())
    [running], [stopped] = report["submit_worker_running"], report["submit_worker_stopped"]
    # the worker's processes ran while it was running, and were metered; stopped, not at all
    assert running["supervisor (process)_us"] > 0 and running["event loop_us"] > 0, running
    assert "supervisor (process)_us" not in stopped and stopped["store-writer_us"] > 0, stopped
    assert "running the tasks" in result.stdout and "processes stopped" in result.stdout
