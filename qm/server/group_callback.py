"""A group's callback task, made inside the store transaction that counted its last member.

Both stores call `callback_task` with the group row and its members' records (read in that
transaction), so the callback's payload is built from exactly the outcomes counted. The
payload is one JSON document (UTF-8, whatever the callback type's codec):

    {"group_id": "...", "payload": <the callback's own payload>,
     "task_ids": [...], "results": [<result or null>, ...],        # member order
     "failures": [{"index": 2, "task_id": "...", "state": "FAILED", "error": "..."}],
     "succeeded": 9, "failed": 1, "results_omitted": false}

A result is given as its codec reads it: a JSON value (json), a string (text) or a base64
string (bytes); "payload" likewise by the callback type's codec. Each result is at most
worker.max_result_bytes (1 MiB by default); when the document would pass
MAX_CALLBACK_PAYLOAD_BYTES the results are left out ("results": all null,
"results_omitted": true) and the callback reads them itself (GetTaskStatus of task_ids).
"""

from __future__ import annotations

import base64
import dataclasses
import json

from qm.messages import TaskMessage
from qm.server.store_api import GroupRecord, TaskRecord
from qm.states import TaskState

#: Largest callback payload that carries the members' results (16 MiB, far below
#: RabbitMQ's 128 MiB message limit); past it the results are left out (see above).
MAX_CALLBACK_PAYLOAD_BYTES = 16 * 1024 * 1024


def callback_task(
    group: GroupRecord, members: list[TaskRecord], codec_of: dict[str, str], now_s: float
) -> tuple[TaskRecord, str, bytes]:
    """The callback's QUEUED record, work queue and message body (its payload the document)."""
    message = TaskMessage.decode(group.callback_body)
    codec = codec_of.get(message.type, "text")
    payload = callback_payload(group.group_id, _readable(message.payload, codec), members)
    record = dataclasses.replace(
        TaskRecord.queued(
            message.task_id,
            message.type,
            message.queue,
            codec,
            now_s,
            message.timeout_s,
            message.memory_limit_mb,
            max_retries=message.retry.max_retries,
        ),
        group_id=group.group_id,
    )
    body = dataclasses.replace(message, payload=payload, enqueued_at_s=now_s).encode()
    return record, message.queue, body


def callback_payload(
    group_id: str, payload: object, members: list[TaskRecord], max_bytes: int = MAX_CALLBACK_PAYLOAD_BYTES
) -> bytes:
    """The callback's payload document (see the module docstring)."""
    results: list[object] = []
    failures: list[dict[str, object]] = []
    for index, member in enumerate(members):
        if member.state is TaskState.SUCCEEDED:
            results.append(_readable(member.result or b"", member.codec))
        else:
            results.append(None)
            failures.append(
                {"index": index, "task_id": member.task_id, "state": member.state.name, "error": member.error}
            )
    document = {
        "group_id": group_id,
        "payload": payload,
        "task_ids": [member.task_id for member in members],
        "results": results,
        "failures": failures,
        "succeeded": len(members) - len(failures),
        "failed": len(failures),
        "results_omitted": False,
    }
    encoded = json.dumps(document, separators=(",", ":")).encode()
    if len(encoded) > max_bytes:
        document["results"] = [None] * len(members)
        document["results_omitted"] = True
        encoded = json.dumps(document, separators=(",", ":")).encode()
    return encoded


def _readable(data: bytes, codec: str) -> object:
    """Bytes as JSON can carry them: parsed (json), text, or base64 (bytes, or not UTF-8)."""
    if codec == "json":
        try:
            return json.loads(data) if data else None
        except ValueError:
            pass
    if codec in ("json", "text"):
        try:
            return data.decode()
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode()
