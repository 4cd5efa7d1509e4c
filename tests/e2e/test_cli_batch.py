"""`qm submit --from-file`, `--wait-timeout`, and `qm submit --wait` across a kill -9 and
restart of the server, as a user runs them (real qm-server, qm-worker, RabbitMQ)."""
from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

from tests.processes import Process, command, run_qm, wait_until

#: Bound on tasks finishing and commands exiting.
RESULT_TIMEOUT_S = 90.0
EXIT_TIMEOUT = 124


def explain(result) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"


def submit(stack, *args: str, input: str | None = None):
    return run_qm("submit", *args, "--queue", stack.queue, server=stack.server.address, input=input)


def test_from_file_submits_one_task_per_line_and_prints_the_ids_in_order(stack, tmp_path):
    lines = tmp_path / "exprs.txt"
    lines.write_text("1 + 1\n\n2 * 3\n   \n10 - 4\n", encoding="utf-8")

    result = submit(stack, "-T", "math", "--from-file", str(lines))

    assert result.returncode == 0, explain(result)
    ids = result.stdout.splitlines()
    assert len(ids) == 3 and all(str(uuid.UUID(task_id)) == task_id for task_id in ids), explain(result)
    assert [stack.client.result(task_id, timeout_s=RESULT_TIMEOUT_S) for task_id in ids] == ["2", "6", "6"]


def test_from_stdin_with_wait_prints_the_results_in_the_order_of_the_lines(stack):
    payloads = ["0.6", "0.1", "0.3", "0.2"]  # finish out of order on two children

    result = submit(stack, "-T", "test.sleep", "--from-file", "-", "--wait", input="\n".join(payloads) + "\n")

    assert result.returncode == 0, explain(result)
    assert result.stdout.splitlines() == payloads, explain(result)


def test_a_refused_line_is_named_by_its_number_and_the_others_run(stack, tmp_path):
    lines = tmp_path / "mixed.txt"
    lines.write_text("1 + 1\n1 +\n\n3 * 3\n", encoding="utf-8")

    result = submit(stack, "-T", "math", "--from-file", str(lines), "--wait")

    assert result.returncode == 2, explain(result)
    assert result.stdout.splitlines() == ["2", "9"], explain(result)
    assert "line 2: INVALID_ARGUMENT" in result.stderr and "payload" in result.stderr, explain(result)


def test_a_missing_file_is_bad_input(stack, tmp_path):
    result = submit(stack, "-T", "math", "--from-file", str(tmp_path / "nope.txt"))

    assert result.returncode == 2 and "nope.txt" in result.stderr, explain(result)


def test_submit_wait_timeout_exits_124_printing_the_id_to_follow(stack):
    result = submit(stack, "-T", "test.sleep", "-P", "30", "--wait", "--wait-timeout", "1")

    assert result.returncode == EXIT_TIMEOUT, explain(result)
    task_id = result.stdout.strip()
    assert str(uuid.UUID(task_id)) == task_id, explain(result)
    assert f"qm watch {task_id}" in result.stderr, explain(result)
    assert stack.client.status(task_id).state in ("QUEUED", "RUNNING")  # it goes on
    stack.client.cancel(task_id)


def test_watch_wait_timeout_exits_124_naming_the_unfinished_tasks(stack):
    slow = stack.client.submit("test.sleep", "30", queue=stack.queue)
    quick = stack.client.submit("math", "2 + 2", queue=stack.queue)
    assert stack.client.result(quick, timeout_s=RESULT_TIMEOUT_S) == "4"

    result = run_qm("watch", slow, quick, "--wait-timeout", "1.5", "--json", server=stack.server.address)

    assert result.returncode == EXIT_TIMEOUT, explain(result)
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"id": quick, "state": "SUCCEEDED"}.items() <= next(p for p in printed if p["id"] == quick).items()
    assert f"qm watch {slow}" in result.stderr and quick not in result.stderr, explain(result)
    stack.client.cancel(slow)


@pytest.mark.timeout(300)
def test_submit_wait_rides_out_a_kill_9_and_restart_of_the_server(stack, launcher):
    key = f"cli-{uuid.uuid4().hex}"
    waiting = Process("qm submit --wait", [command("qm"), "--server", stack.server.address, "submit",
                                           "-T", "test.sleep", "-P", "4", "--queue", stack.queue,
                                           "--idempotency-key", key, "--wait"])
    server = stack.server
    task_id = wait_until(lambda: _task_of_key(server, key), RESULT_TIMEOUT_S, message="the task stored")
    wait_until(lambda: stack.client.status(task_id).state == "RUNNING", RESULT_TIMEOUT_S, message="running")
    assert waiting.alive()

    server.kill()
    restarted = launcher.server(stack.broker_url, server_id=server.server_id,
                                extra_args=["--listen", f"127.0.0.1:{server.port}"])

    assert waiting.wait(RESULT_TIMEOUT_S) == 0, f"{waiting.logs}\n{restarted.logs}"
    assert waiting.stdout == "4", waiting.logs


def _task_of_key(server, key: str) -> str | None:
    """The id of the task stored under an idempotency key, read from the server's store."""
    store = sqlite3.connect(f"file:{server.data_dir / (server.server_id + '.sqlite3')}?mode=ro", uri=True,
                            timeout=10)
    try:
        row = store.execute("SELECT task_id FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:  # not created yet
        return None
    finally:
        store.close()
