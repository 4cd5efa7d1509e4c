"""The installed commands' help, configuration errors and signal handling."""
from __future__ import annotations

import re
import signal
import subprocess

import pytest

import qm
from tests.processes import STOP_TIMEOUT_S, clean_env, command

HELP_TIMEOUT_S = 60.0
SERVER_FLAGS = ["--config", "--listen", "--broker-url", "--data-dir", "--server-id", "--log-level"]
WORKER_FLAGS = ["--config", "--procs", "--broker-url", "--queues", "--prefetch", "--worker-id", "--log-level"]


HELP_CASES = [
    (["qm", "--help"], ["--server", "--config", "submit", "submit-group", "status", "watch"]),
    (["qm", "submit", "--help"], ["--type", "-T", "--payload", "-P", "--queue", "--wait", "--json"]),
    (["qm", "status", "--help"], ["ID", "--json", "group"]),
    (["qm", "submit-group", "--help"], ["--type", "-T", "--from-file", "--then", "--then-payload", "--queue",
                                        "--idempotency-key", "--wait", "--json", "failures"]),
    (["qm", "watch", "--help"], ["ID", "--json"]),
    (["qm-server", "--help"], SERVER_FLAGS),
    (["qm-worker", "--help"], WORKER_FLAGS),
]


@pytest.mark.parametrize("argv, mentions", [pytest.param(argv, mentions, id=" ".join(argv))
                                            for argv, mentions in HELP_CASES])
def test_help_exits_0_and_mentions_every_flag(argv, mentions):
    result = subprocess.run([command(argv[0]), *argv[1:]], env=clean_env(), capture_output=True, text=True,
                            timeout=HELP_TIMEOUT_S, stdin=subprocess.DEVNULL)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
    missing = [flag for flag in mentions if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)]
    assert not missing, f"{' '.join(argv)} does not mention {missing}:\n{result.stdout}"


def test_bad_config_value_is_refused_naming_the_key():
    result = subprocess.run([command("qm-worker")], env=clean_env({"QM_WORKER__PROCS": "many"}),
                            capture_output=True, text=True, timeout=HELP_TIMEOUT_S, stdin=subprocess.DEVNULL)

    assert result.returncode == 2, result.stderr
    assert "worker.procs" in result.stderr and "many" in result.stderr, result.stderr
    assert "QM_WORKER__PROCS" in result.stderr, result.stderr


def test_ctrl_c_stops_the_server(rabbitmq, launcher):
    server = launcher.server(rabbitmq.url)

    server.signal(signal.SIGINT, group=True)  # what Ctrl-C in its terminal does

    assert server.wait(STOP_TIMEOUT_S) == 0, server.logs
    assert re.search(r"qm-server stopped$", server.stderr, re.MULTILINE), server.logs


def test_ctrl_c_stops_the_worker_after_its_running_task(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue)
    with qm.Client(server.address) as client:
        task_id = client.submit("test.sleep", "1.5", queue=queue)
        for status in client.watch([task_id], timeout_s=60):
            if status.state == "RUNNING":
                break

        worker.signal(signal.SIGINT, group=True)

        assert worker.wait(STOP_TIMEOUT_S) == 0, worker.logs
        assert re.search(r"worker stopped$", worker.stderr, re.MULTILINE), worker.logs
        *_, final = client.watch([task_id], timeout_s=60)
        # Ctrl-C drains: the running task finishes (it is neither killed nor CRASHED).
        assert (final.state, final.result) == ("SUCCEEDED", "1.5"), f"{final}\n{worker.logs}"
