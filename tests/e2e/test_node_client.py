"""The API as a client in another language sees it: Node.js with @grpc/grpc-js and
@grpc/proto-loader, built only from protos/ (tools/node/api_client.js), against a real
qm-server and qm-worker."""
from __future__ import annotations

import json
import subprocess

from tests.requirements import NODE_TOOLS, require_node

#: Bound on the whole Node.js run (its own calls have deadlines of 30 s and 90 s).
NODE_RUN_TIMEOUT_S = 150.0

TERMINAL = {"TASK_STATE_SUCCEEDED", "TASK_STATE_FAILED", "TASK_STATE_TIMED_OUT", "TASK_STATE_MEMORY_EXCEEDED",
            "TASK_STATE_CRASHED", "TASK_STATE_CANCELLED"}


def run_node_client(node: str, stack) -> dict:
    run = subprocess.run([node, str(NODE_TOOLS / "api_client.js"), stack.server.address, stack.queue],
                         capture_output=True, text=True, timeout=NODE_RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, f"{run.stderr}\n{stack.server.logs}\n{stack.worker.logs}"
    return json.loads(run.stdout)


def test_a_node_client_built_from_the_protos_submits_follows_and_gets_error_codes(stack):
    node = require_node()

    seen = run_node_client(node, stack)

    task_id = seen["submitted"]["task_id"]
    assert task_id and seen["submitted"]["state"] == "TASK_STATE_QUEUED"

    stream = seen["stream"]
    assert stream and {update["task_id"] for update in stream} == {task_id}
    assert [update["state"] for update in stream if update["state"] in TERMINAL] == ["TASK_STATE_SUCCEEDED"]
    assert stream[-1]["state"] == "TASK_STATE_SUCCEEDED"
    assert stream[-1]["result"] == "11" and stream[-1]["codec"] == "text"

    status = seen["status"]
    assert status["state"] == "TASK_STATE_SUCCEEDED" and status["result"] == "11"
    assert status["attempts"] == 1 and status["created_at"] <= status["finished_at"]

    # the same task as the Python client sees it
    assert stack.client.status(task_id).result == "11"

    unknown = seen["unknown_type"]
    assert unknown.get("code_name") == "INVALID_ARGUMENT", unknown
    assert "no.such.type" in unknown["details"]
