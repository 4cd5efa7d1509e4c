"""Run one task here, through the same child-process path a worker uses, without server
or broker: the plugin author's quickest loop (`qm run`) and `qm.testing.run_task`.

The payload is checked by the type's validator (as the server would), limits are
resolved as the server would, and the job runs in a fresh pool child with the hard
deadline, RSS watchdog and soft timeout (if one applies) enforced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any, Callable

from qm import limits as task_limits
from qm.codecs import decode_result, encode_payload
from qm.registry import Registry, discover
from qm.states import TaskState
from qm.task_progress import Progress
from qm.worker.pool import Job, Pool

#: Hard limit when neither the call nor the task type sets one (as server.default_task_timeout_s).
DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class LocalResult:
    """How a local run ended; `value` is the decoded result when it SUCCEEDED."""

    state: str
    value: Any
    error: str
    timeout_s: float
    memory_limit_mb: int
    soft_timeout_s: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def run_task(
    task_type: str,
    payload: Any,
    *,
    timeout_s: float = 0.0,
    memory_limit_mb: int = 0,
    soft_timeout_s: float = 0.0,
    start_method: str = "spawn",
    registry: Registry | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> LocalResult:
    """Run one task in a child process with its limits; ValidationError for a bad payload
    or limit (a soft_timeout_s not below the time limit, as the server refuses it).
    `on_progress` gets each update the task reports with qm.progress() (not rate-limited)."""
    return asyncio.run(
        run_task_async(
            task_type,
            payload,
            timeout_s=timeout_s,
            memory_limit_mb=memory_limit_mb,
            soft_timeout_s=soft_timeout_s,
            start_method=start_method,
            registry=registry,
            on_progress=on_progress,
        )
    )


async def run_task_async(
    task_type: str,
    payload: Any,
    *,
    timeout_s: float = 0.0,
    memory_limit_mb: int = 0,
    soft_timeout_s: float = 0.0,
    start_method: str = "spawn",
    registry: Registry | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> LocalResult:
    registry = registry or discover()
    declared = registry.get(task_type)
    raw = encode_payload(payload)
    declared.check_payload(raw)
    limits = task_limits.resolve(
        declared,
        timeout_s,
        memory_limit_mb,
        default_timeout_s=DEFAULT_TIMEOUT_S,
        default_memory_limit_mb=0,
        consumer_timeout_s=math.inf,
        soft_timeout_s=soft_timeout_s,
    )
    job = Job("local", task_type, raw, limits.timeout_s, limits.memory_limit_mb, limits.soft_timeout_s)
    pool = Pool(1, start_method)
    await pool.start()
    try:
        outcome = await pool.run(job, on_progress=on_progress)
    finally:
        await pool.stop()
    value = decode_result(declared.codec, outcome.result) if outcome.state is TaskState.SUCCEEDED else None
    return LocalResult(
        outcome.state.name, value, outcome.error, limits.timeout_s, limits.memory_limit_mb, limits.soft_timeout_s
    )
