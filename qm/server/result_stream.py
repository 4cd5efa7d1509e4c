"""What a StreamTaskResults stream sends: followed tasks' records in, responses out.

    hub / follow requests ──► updates (asyncio.Queue of records, None, QMError)
                                  │  one `await get()`, then what is already queued
                                  ▼  (batched streams only)
                      skip what was sent or is not final (final_only)
                                  ▼
                      one response: `status`, or `statuses` (batched, at most
                      `response_bytes` of them, a larger status alone)

A SCHEDULED task is shown again, QUEUED, when due, unless a later state was sent first.
The stream ends when the client half-closed and every followed task was sent terminal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from qm import scheduling
from qm._proto.qm.v1 import task_queue_pb2
from qm.errors import QMError
from qm.server.store_api import TaskRecord
from qm.states import TaskState

#: A stream shows a SCHEDULED task again (QUEUED) this long after its due time.
DUE_MARGIN_S = 0.01
#: Bytes of statuses one response of a batched stream packs at most (a larger status goes
#: alone, as it would unbatched): far under gRPC's 4 MiB default message limit. A server
#: with a smaller server.max_message_bytes packs at most half of that (`response_bytes`).
RESPONSE_BYTES = 64 * 1024


def response_bytes(max_message_bytes: int) -> int:
    """What a batched response packs at most under a gRPC message limit."""
    return min(RESPONSE_BYTES, max_message_bytes // 2)


@dataclasses.dataclass
class StreamOptions:
    """A stream's options, from its first request (read before any status is queued)."""

    final_only: bool = False  # send terminal states only (StreamTaskResultsRequest.final_only)
    batched: bool = False  # pack what is ready into one response (StreamTaskResultsRequest.batched)
    response_bytes: int = RESPONSE_BYTES  # ... up to this many bytes of statuses
    read: bool = False


@dataclasses.dataclass(frozen=True)
class _CameDue:
    """A SCHEDULED record a stream sent, put back at its due time to be shown QUEUED."""

    record: TaskRecord


class _Sent:
    """What a stream sent so far, and whether the client is done asking."""

    def __init__(self, updates: asyncio.Queue, options: StreamOptions) -> None:
        self.updates = updates
        self.options = options
        self.keys: dict[str, tuple] = {}
        self.finished: set[str] = set()
        self.client_done = False
        self.timers: list[asyncio.TimerHandle] = []

    def complete(self, followed: set[str]) -> bool:
        return self.client_done and self.finished >= followed

    def status_of(self, item: TaskRecord | _CameDue | QMError | None) -> task_queue_pb2.TaskStatus | None:
        """The proto to send for a queued item, or None (nothing new); raises a queued error."""
        if item is None:
            self.client_done = True
            return None
        if isinstance(item, QMError):
            raise item
        if isinstance(item, _CameDue):
            item = item.record
            if self.keys.get(item.task_id) != (TaskState.SCHEDULED, item.attempts, item.updated_at, item.progress_at):
                return None  # it moved on meanwhile
        if self.options.final_only and not item.state.terminal:
            return None  # skipped before it costs a proto
        status = record_to_proto(item)
        key = (TaskState.of_number(status.state), item.attempts, item.updated_at, item.progress_at)
        if item.task_id in self.finished or self.keys.get(item.task_id) == key:
            return None
        self.keys[item.task_id] = key
        if item.state.terminal:
            self.finished.add(item.task_id)
        elif key[0] is TaskState.SCHEDULED and item.next_attempt_at is not None:
            wait_s = item.next_attempt_at - time.time() + DUE_MARGIN_S
            self.timers.append(asyncio.get_running_loop().call_later(wait_s, self.updates.put_nowait, _CameDue(item)))
        return status


def record_to_proto(record: TaskRecord) -> task_queue_pb2.TaskStatus:
    """The TaskStatus users see (a SCHEDULED task past its due time shows QUEUED)."""
    state = scheduling.shown_state(record.state, record.next_attempt_at, time.time())
    status = task_queue_pb2.TaskStatus(
        task_id=record.task_id,
        type=record.type,
        queue=record.queue,
        state=int(state),  # type: ignore[arg-type]  # protoc .pyi: enum fields typed as the enum class; they take ints
        attempts=record.attempts,
        result=record.result or b"",
        codec=record.codec,
        error=record.error,
        worker=record.worker,
        timeout_s=record.timeout_s,
        memory_limit_mb=record.memory_limit_mb,
        max_retries=record.max_retries,
        progress=record.progress,
        progress_message=record.progress_message,
        progress_detail_json=record.progress_detail_json,
        priority=record.priority,
        cpus=record.cpus,
        schedule_id=record.schedule_id,
        group_id=record.group_id,
    )
    set_times(
        status,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        updated_at=record.updated_at,
        next_attempt_at=record.next_attempt_at,
        progress_at=record.progress_at,
    )
    return status


def set_times(message: Any, **epoch_s: float | None) -> None:
    """Set each named Timestamp field of `message` from epoch seconds; None leaves it unset."""
    for field, seconds in epoch_s.items():
        if seconds is not None:
            getattr(message, field).FromNanoseconds(int(seconds * 1e9))


async def responses(
    updates: asyncio.Queue, followed: set[str], options: StreamOptions
) -> AsyncIterator[task_queue_pb2.StreamTaskResultsResponse]:
    """The stream's responses from its queued records, until the client is done and every
    followed task was sent terminal."""
    sent = _Sent(updates, options)
    try:
        while not sent.complete(followed):
            status = sent.status_of(await updates.get())
            if not options.batched:
                if status is not None:
                    yield task_queue_pb2.StreamTaskResultsResponse(status=status)
                continue
            batch, size = ([status], status.ByteSize()) if status is not None else ([], 0)
            while not updates.empty() and not sent.complete(followed) and size < options.response_bytes:
                status = sent.status_of(updates.get_nowait())
                if status is None:
                    continue
                status_bytes = status.ByteSize()
                if batch and size + status_bytes > options.response_bytes:
                    yield task_queue_pb2.StreamTaskResultsResponse(statuses=batch)
                    batch, size = [], 0
                batch.append(status)
                size += status_bytes
            if batch:
                yield task_queue_pb2.StreamTaskResultsResponse(statuses=batch)
    finally:
        for timer in sent.timers:
            timer.cancel()
