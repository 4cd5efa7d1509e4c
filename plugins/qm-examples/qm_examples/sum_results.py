"""``examples.sum_results``: a group callback (``qm submit-group --then``) that adds up the
members' numeric results, e.g. of a group of ``math`` tasks.

Payload: the group document qm-server gives a callback (docs/architecture.md, "Groups"):
``{"group_id", "payload", "task_ids", "results", "failures", ...}``. Result (json):
``{"sum": S, "count": N, "failed": F, "failures": [...]}``: S the sum of the results that
read as numbers (a text result such as ``"11"`` counts), N how many did, F the members
that did not succeed, with their failures as the document lists them. Its own payload
(``--then-payload``) is not used.
"""
from __future__ import annotations

from qm.registry import TaskType


def _number(value: object) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return None


def run(document: dict) -> dict:
    """Handler: runs in a worker child on the decoded group document."""
    if not isinstance(document, dict) or "results" not in document:
        raise ValueError("examples.sum_results runs as a group callback (qm submit-group --then); "
                         "its payload is the group document qm-server builds")
    numbers = [number for number in map(_number, document["results"]) if number is not None]
    return {"sum": sum(numbers), "count": len(numbers), "failed": document.get("failed", 0),
            "failures": document.get("failures", [])}


TASK_TYPE = TaskType(
    name="examples.sum_results",
    handler=run,
    codec="json",
    description="Group callback: the sum of the members' numeric results, and the failures",
    default_timeout_s=60,
)
