"""examples.sum_results adds up a group's numeric results and passes its failures on."""
import json

import pytest
from qm_examples import sum_results

from qm import registry
from qm.worker.child import run_job
from qm.worker.jobs import ReplyKind


def test_sums_numbers_and_numeric_text_and_lists_the_failures():
    failure = {"index": 2, "task_id": "t2", "state": "FAILED", "error": "boom"}
    document = {"group_id": "g", "payload": None, "results": ["11", 2.5, None, "x", 4],
                "failures": [failure], "failed": 1}
    assert sum_results.run(document) == {"sum": 17.5, "count": 3, "failed": 1, "failures": [failure]}


def test_a_payload_that_is_not_a_group_document_fails_saying_so():
    with pytest.raises(ValueError, match="group callback"):
        sum_results.run({"samples": 3})


def test_a_worker_child_runs_it_on_the_document_bytes():
    checked = registry.validate([sum_results.TASK_TYPE])
    body = json.dumps({"group_id": "g", "results": ["1", "2"], "failures": [], "failed": 0}).encode()
    reply = run_job(checked, "examples.sum_results", body)
    assert reply.kind is ReplyKind.OK and json.loads(reply.value) == {"sum": 3, "count": 2, "failed": 0, "failures": []}
