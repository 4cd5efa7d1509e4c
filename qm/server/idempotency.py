"""What an idempotency key promises: the same key with the same request is the same task.

A key is kept with a digest of the request it first came with. A later submit under the
key is compared by that digest: the same request gets the first task back (a client's
retry), another request is refused (`IdempotencyKeyReused`, FAILED_PRECONDITION), so a
caller never mistakes the first task's result for the answer to its second request.

The digest covers the request as the client sent it, after validation: task type,
payload, logical queue (empty = "default"), time limits (hard and soft), memory limit,
the retry options (an option left unset, None, differs from one set to the task
type's value: it may resolve differently), a delay (delay_s or not_before) when
set, the priority when set (unset differs from one set to the type's default), and cpus
when set (as sent: 0, the type's, is not 1). It does not cover what the server resolves
from its own settings, so a retry after a configuration change or an upgrade is still
the same request.

Keys live as long as their task's row: until server.retention_s after the task finished.
A row written before digests were kept has none; a key found there is accepted as before.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from qm.errors import IdempotencyKeyReused

if TYPE_CHECKING:
    from qm.server.submission import Submission

#: Version tag of the canonical encoding; a digest of another version is never compared.
DIGEST_VERSION = "v1"


def request_digest(
    task_type: str,
    payload: bytes,
    queue: str,
    timeout_s: float,
    memory_limit_mb: int,
    retry_options: dict[str, Any],
    soft_timeout_s: float = 0.0,
    delay: dict[str, float | None] | None = None,
    priority: int | None = None,
    cpus: int = 0,
) -> str:
    """`v1:` + SHA-256 over a canonical encoding of the request (sorted JSON, the payload
    by its own SHA-256, floats as floats: `timeout_s` 5 and 5.0 are one request)."""
    fields = {
        "type": task_type,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "queue": queue,
        "timeout_s": float(timeout_s),
        "soft_timeout_s": float(soft_timeout_s),
        "memory_limit_mb": int(memory_limit_mb),
        "retry": {name: _canonical(value) for name, value in sorted(retry_options.items()) if value is not None},
    }
    asked = {name: float(value) for name, value in sorted((delay or {}).items()) if value is not None}
    if asked:  # absent otherwise: the digest of a request without a delay is as before
        fields["delay"] = asked
    if priority is not None:  # likewise: a request without one digests as before priorities
        fields["priority"] = int(priority)
    if cpus:  # as sent (0 = the type's); absent when 0, so older digests still match
        fields["cpus"] = int(cpus)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return f"{DIGEST_VERSION}:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"


def submission_digest(item: Submission) -> str:
    """`request_digest` of a decoded request (a group's item, a schedule's task)."""
    return request_digest(
        item.type,
        item.payload,
        item.queue or "default",
        item.timeout_s,
        item.memory_limit_mb,
        item.retry_options,
        item.soft_timeout_s,
        {"delay_s": item.delay_s, "not_before_s": item.not_before_s},
        item.priority,
        item.cpus,
    )


def _canonical(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    return float(value)


def check_reuse(key: str, stored_digest: str, digest: str, task_id: str) -> None:
    """Raise IdempotencyKeyReused unless `digest` is the request the key was first used for.
    A stored digest that is empty (a row from before digests) or of another encoding
    version cannot be compared: accepted."""
    if not stored_digest or stored_digest.split(":", 1)[0] != digest.split(":", 1)[0]:
        return
    if stored_digest != digest:
        raise IdempotencyKeyReused(key, task_id)
