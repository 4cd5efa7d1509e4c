"""One submission as the service takes it, whichever RPC brought it (SubmitTask, SubmitTasks)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Submission:
    """A task to accept: the request's fields, limits 0 and retry options None = defaults.

    `retry_options` holds the RetryPolicy fields the request set (max_retries, backoff_s,
    backoff_max_s, jitter, on_timeout); a field left out takes the type's, else the
    server's default.
    """

    type: str
    payload: bytes
    queue: str = ""
    timeout_s: float = 0.0
    memory_limit_mb: int = 0
    idempotency_key: str = ""
    soft_timeout_s: float = 0.0
    retry_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    delay_s: float | None = None  # run no earlier than this after acceptance (qm/scheduling.py)
    not_before_s: float | None = None  # run no earlier than this time, epoch seconds
    priority: int | None = None  # 0-9, higher first; None = the task type's default (qm/priority.py)
    cpus: int = 0  # CPU slots it takes on a worker; 0 = the task type's
