"""What travels on a pool slot's pipe (pickled), both ways:

    supervisor → child: Job                       one task to run
    child → supervisor: Reply(READY, pid)         once, after start-up (own session by then)
                        Reply(PROGRESS, task id, progress=update)   any number, while a task runs
                        Reply(OK, result bytes) | Reply(<failure kind>, error text)

A job's reply carries when the child took the job and when it sent the reply, on the
child's `time.monotonic()` (CLOCK_MONOTONIC, one clock for every process of the host):
the supervisor measures a child's idle gap between two tasks from them.
"""

from __future__ import annotations

import dataclasses
import enum

from qm.priority import DEFAULT_PRIORITY
from qm.task_progress import Progress


@dataclasses.dataclass(frozen=True)
class Job:
    task_id: str
    type: str
    payload: bytes
    timeout_s: float = 0.0  # hard limit; 0 = none
    memory_limit_mb: int = 0  # RSS limit with descendants; 0 = none
    soft_timeout_s: float = 0.0  # when the task gets qm.SoftTimeout; 0 = never
    priority: int = DEFAULT_PRIORITY  # 0-9: a free child takes the highest waiting (qm/worker/ready.py)
    cpus: int = 1  # CPU slots it holds while it runs (qm/worker/cpu_slots.py)
    cores: tuple[int, ...] = ()  # CPUs the child pins it to; () = not pinned (set as it is sent)


class ReplyKind(enum.Enum):
    READY = "ready"  # value: the child's pid
    OK = "ok"  # value: the encoded result
    ERROR = "error"  # value: error text (retried per policy)
    SOFT_TIMEOUT = "soft_timeout"  # the task let qm.SoftTimeout escape
    MEMORY = "memory"  # MemoryError under the address-space cap
    RETRY = "retry"  # the task raised qm.Retry (retry_delay_s: its delay)
    PERMANENT = "permanent"  # the task raised qm.PermanentError: never retried
    PROGRESS = "progress"  # value: the task id; progress: what qm.progress() reported


@dataclasses.dataclass(frozen=True)
class Reply:
    kind: ReplyKind
    value: bytes | str | int = b""
    retry_delay_s: float | None = None
    progress: Progress | None = None
    received_at_s: float = 0.0  # monotonic: the child took the job off the pipe
    replied_at_s: float = 0.0  # monotonic: the child is sending this reply
    idle_rss_bytes: int = 0  # the child's RSS after the task (if the pool asked for it)
