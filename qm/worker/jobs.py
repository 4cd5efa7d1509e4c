"""What travels on a pool slot's pipe, both ways, as marshalled tuples of plain values:

    supervisor → child: Job                       one task to run
    child → supervisor: Reply(READY, pid)         once, after start-up (own session by then)
                        Reply(PROGRESS, task id, progress=update)   any number, while a task runs
                        Reply(OK, result bytes) | Reply(<failure kind>, error text)

A job's reply carries when the child took the job and when it sent the reply, on the
child's `time.monotonic()` (CLOCK_MONOTONIC, one clock for every process of the host):
the supervisor measures a child's idle gap between two tasks from them.

Marshal, not pickle (measured on the 2-core test machine: multiprocessing's pickler took
27 µs a task for a job and its reply both ways, about 6 µs as tuples). It also means the
supervisor never unpickles what a child wrote: a reply that does not decode to these
fields is refused (`ValueError`), never turned into arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import enum
import marshal

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


def encode_job(job: Job, cores: tuple[int, ...] | None = None) -> bytes:
    """The job as sent on the pipe, pinned to `cores` if given."""
    return marshal.dumps(
        (
            job.task_id,
            job.type,
            job.payload,
            job.timeout_s,
            job.memory_limit_mb,
            job.soft_timeout_s,
            job.priority,
            job.cpus,
            job.cores if cores is None else cores,
        )
    )


def decode_job(data: bytes) -> Job:
    return Job(*marshal.loads(data))


_KINDS = {kind.value: kind for kind in ReplyKind}


def encode_reply(reply: Reply, received_at_s: float = 0.0, replied_at_s: float = 0.0, idle_rss_bytes: int = 0) -> bytes:
    """The reply as sent on the pipe, with the child's times and RSS (taken from `reply`
    where not given)."""
    progress = reply.progress
    return marshal.dumps(
        (
            reply.kind.value,
            reply.value,
            reply.retry_delay_s,
            None if progress is None else (progress.fraction, progress.message, progress.detail_json),
            received_at_s or reply.received_at_s,
            replied_at_s or reply.replied_at_s,
            idle_rss_bytes or reply.idle_rss_bytes,
        )
    )


def decode_reply(data: bytes | bytearray) -> Reply:
    """A reply from a child's bytes; ValueError if they are not one."""
    try:
        kind, value, retry_delay_s, progress, received_at_s, replied_at_s, idle_rss_bytes = marshal.loads(data)
        return Reply(
            _KINDS[kind],
            value,
            retry_delay_s,
            None if progress is None else Progress(*progress),
            received_at_s,
            replied_at_s,
            idle_rss_bytes,
        )
    except (EOFError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a reply ({len(data)} bytes): {exc!r}") from None
