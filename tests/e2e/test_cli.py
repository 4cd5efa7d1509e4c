"""The `qm` command as a user runs it, against a real qm-server, qm-worker and RabbitMQ."""
from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.processes import COMMAND_TIMEOUT_S, Process, command, run_qm

#: Bound on `qm watch` printing an expected line.
LINE_TIMEOUT_S = 60.0
STATUS_KEYS = {"id", "type", "state", "attempts", "result", "error", "worker", "created_at", "started_at",
               "finished_at"}


def explain(result) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"


def submit(stack, *args: str):
    return run_qm("submit", *args, "--queue", stack.queue, server=stack.server.address)


def test_submit_prints_a_task_id(stack):
    result = submit(stack, "-T", "math", "-P", "1 + 2 * 5")

    assert result.returncode == 0, explain(result)
    task_id = result.stdout.strip()
    assert str(uuid.UUID(task_id)) == task_id, explain(result)
    assert result.stdout == task_id + "\n"


def test_submit_wait_prints_only_the_result(stack):
    result = submit(stack, "-T", "math", "-P", "1 + 2 * 5", "--wait")

    assert result.returncode == 0, explain(result)
    assert result.stdout == "11\n", explain(result)


def test_submit_json_prints_the_id_as_json_and_with_wait_the_final_status(stack):
    """README: `qm submit ... --json`: one JSON object, the task id; with --wait the task's
    whole final status (and exit 1 if it did not succeed)."""
    submitted = submit(stack, "-T", "math", "-P", "1 + 2 * 5", "--json")
    assert submitted.returncode == 0, explain(submitted)
    printed = json.loads(submitted.stdout)  # the whole output is one JSON object
    assert list(printed) == ["id"] and str(uuid.UUID(printed["id"])) == printed["id"], submitted.stdout
    assert run_qm("watch", printed["id"], server=stack.server.address).returncode == 0

    waited = submit(stack, "-T", "math", "-P", "6 * 7", "--wait", "--json")
    assert waited.returncode == 0, explain(waited)
    status = json.loads(waited.stdout)
    assert isinstance(status, dict) and STATUS_KEYS <= set(status), waited.stdout
    assert (status["type"], status["state"], status["attempts"]) == ("math", "SUCCEEDED", 1), status
    assert status["result"] == "42"
    assert status["worker"] == stack.worker.worker_id
    assert all(status[key] for key in ("created_at", "started_at", "finished_at")), status

    failed = submit(stack, "-T", "test.fail", "-P", "boom", "--wait", "--json")
    assert failed.returncode == 1, explain(failed)
    status = json.loads(failed.stdout)
    assert status["state"] == "FAILED" and "RuntimeError: boom" in status["error"], failed.stdout


def test_status_shows_the_finished_task_as_text_and_json(stack):
    task_id = submit(stack, "-T", "math", "-P", "1 + 2 * 5").stdout.strip()
    assert run_qm("watch", task_id, server=stack.server.address).returncode == 0

    text = run_qm("status", task_id, server=stack.server.address)
    assert text.returncode == 0, explain(text)
    rows = dict(line.split(None, 1) for line in text.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert rows["id"] == task_id
    assert rows["state"] == "SUCCEEDED", text.stdout
    assert rows["result"] == "11", text.stdout
    assert rows["worker"] == stack.worker.worker_id

    as_json = run_qm("status", task_id, "--json", server=stack.server.address)
    assert as_json.returncode == 0, explain(as_json)
    status = json.loads(as_json.stdout)  # the whole output is one JSON object
    assert isinstance(status, dict) and STATUS_KEYS <= set(status), as_json.stdout
    assert status["id"] == task_id
    assert status["type"] == "math"
    assert status["state"] == "SUCCEEDED"
    assert status["attempts"] == 1
    assert status["result"] == "11"
    assert status["error"] == ""
    assert status["worker"] == stack.worker.worker_id
    assert all(status[key] for key in ("created_at", "started_at", "finished_at")), status


def watch_live(stack, launcher, tasks: list[tuple[str, str]]) -> tuple[Process, list[str]]:
    """Submit tasks to a queue no worker consumes yet, start `qm watch` on them, wait for it
    to show them QUEUED, then start a worker: every later line is a live change."""
    queue = launcher.queue(stack.broker_url)
    ids = []
    for task_type, payload in tasks:
        result = run_qm("submit", "-T", task_type, "-P", payload, "--queue", queue, server=stack.server.address)
        assert result.returncode == 0, explain(result)
        ids.append(result.stdout.strip())
    watch = Process("qm watch", [command("qm"), "--server", stack.server.address, "watch", *ids])
    for task_id in ids:
        watch.wait_for_line(rf"{task_id} QUEUED", LINE_TIMEOUT_S, stream="stdout")
    launcher.worker(stack.broker_url, procs=2, queues=queue)
    return watch, ids


def states_printed(watch: Process, task_id: str) -> list[str]:
    return [line.split()[2] for line in watch.stdout.splitlines() if line.split()[1:2] == [task_id]]


def test_watch_prints_each_change_and_exits_0_when_all_succeeded(stack, launcher):
    watch, (slow, quick) = watch_live(stack, launcher, [("test.sleep", "1.0"), ("math", "2 ** 10")])

    watch.wait_for_line(rf"{slow} RUNNING$", LINE_TIMEOUT_S, stream="stdout")
    watch.wait_for_line(rf"{slow} SUCCEEDED 1.0$", LINE_TIMEOUT_S, stream="stdout")
    watch.wait_for_line(rf"{quick} SUCCEEDED 1024$", LINE_TIMEOUT_S, stream="stdout")
    assert watch.wait(LINE_TIMEOUT_S) == 0, watch.logs
    assert states_printed(watch, slow) == ["QUEUED", "RUNNING", "SUCCEEDED"], watch.logs
    # A task done within moments may go from QUEUED straight to SUCCEEDED on the stream
    # (the server applies events in batches); never backwards, never twice.
    assert states_printed(watch, quick) in (["QUEUED", "RUNNING", "SUCCEEDED"], ["QUEUED", "SUCCEEDED"]), \
        watch.logs


def test_watch_exits_1_when_a_task_failed(stack, launcher):
    watch, (good, bad) = watch_live(stack, launcher, [("math", "1 + 1"), ("test.fail", "boom")])

    watch.wait_for_line(rf"{good} SUCCEEDED 2$", LINE_TIMEOUT_S, stream="stdout")
    watch.wait_for_line(rf"{bad} FAILED RuntimeError: boom$", LINE_TIMEOUT_S, stream="stdout")
    assert watch.wait(LINE_TIMEOUT_S) == 1, watch.logs


def test_bad_submissions_exit_2_naming_the_problem(stack):
    invalid = submit(stack, "-T", "math", "-P", "1 +")
    assert invalid.returncode == 2, explain(invalid)
    assert invalid.stdout == ""
    assert "payload" in invalid.stderr, explain(invalid)

    unknown = submit(stack, "-T", "nosuchtype", "-P", "1")
    assert unknown.returncode == 2, explain(unknown)
    assert unknown.stdout == ""
    assert "nosuchtype" in unknown.stderr and "type" in unknown.stderr, explain(unknown)


def test_submit_wait_of_a_failing_task_exits_1(stack):
    result = submit(stack, "-T", "test.fail", "-P", "boom", "--wait")

    assert result.returncode == 1, explain(result)
    assert result.stdout == ""
    assert "FAILED" in result.stderr and "RuntimeError: boom" in result.stderr, explain(result)


def test_unreachable_server_exits_3():
    result = run_qm("status", "x", server="127.0.0.1:1")

    assert result.returncode == 3, explain(result)
    assert "cannot reach" in result.stderr and "127.0.0.1:1" in result.stderr, explain(result)


@pytest.mark.parametrize("subcommand", ["status", "watch"])
def test_a_reader_that_goes_away_ends_the_command_quietly(stack, subcommand):
    """`qm status ID | head -1`: when the reader closes the pipe, qm stops like a Unix tool
    (status 141, as if killed by SIGPIPE), without a traceback."""
    task_id = stack.client.submit("math", "6 * 7", queue=stack.queue)
    assert stack.client.result(task_id, timeout_s=60) == "42"
    qm_command = subprocess.Popen([command("qm"), "--server", stack.server.address, subcommand, task_id],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  text=True)
    qm_command.stdout.close()  # the reader is gone before qm writes a byte
    _out, err = qm_command.communicate(timeout=COMMAND_TIMEOUT_S)
    assert qm_command.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
