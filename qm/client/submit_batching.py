"""Submits a client has waiting at one moment, sent as one SubmitTasks call.

Many submits at once (`asyncio.gather` over a list, producer coroutines, a pool of
threads sharing one qm.Client) would cost one SubmitTask call per task: gRPC's own cost
per call, about half a millisecond of CPU on each side, for every task. Instead:

- qm.aio.Client (`SubmitBatcher`): submits made in the same turn of the event loop go
  out together, in chunks sent one after another as submit_many sends them
  (`Batch.chunks`). A lone submit is one SubmitTask call, one loop turn later.
- qm.Client (`ThreadSubmitBatcher`), group commit: a thread that finds fewer than
  `max_calls` submit calls in flight sends what is waiting, its own submit and those of
  the threads that queued while the calls were out. A lone thread sends its own, as
  before; nothing waits for company (unlike the publisher clients of Google Pub/Sub,
  which wait a few milliseconds for a batch to fill).

The batch is a fast path only. An item it does not settle takes the lone submit's path
(`send_one`: its retries, failover and idempotency key): an item refused with a code a
submit retries (its broker away, a full queue), every item of a call that failed as a
whole, every item sent to a server without SubmitTasks (which ends batching for the
client). So `submit` returns or raises what it would have alone.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable

import grpc

from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import MAX_BATCH_BYTES, SUBMIT_RETRY_CODES, Batch, RemoteError, status_code
from qm.reasons import parse_reason

#: What a waiting submit is told when the batch did not settle it: send it alone.
ALONE = object()


class SubmitBatcher:
    """Collects a loop turn's submits and settles them with one call per chunk.

    `send_one(request)` is the lone submit (returns the id or raises); `send_batch(request)`
    one SubmitTasks try, returning `(response, address)` or raising grpc.RpcError."""

    def __init__(
        self,
        send_one: Callable[[task_queue_pb2.SubmitTaskRequest], Awaitable[str]],
        send_batch: Callable[[task_queue_pb2.SubmitTasksRequest], Awaitable[tuple[object, str]]],
        max_items: int,
        max_bytes: int = MAX_BATCH_BYTES,
    ):
        self._send_one = send_one
        self._send_batch = send_batch
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.enabled = True  # False once a server answered SubmitTasks UNIMPLEMENTED
        self._waiting: list[tuple[task_queue_pb2.SubmitTaskRequest, asyncio.Future]] = []
        self._calls: set[asyncio.Task] = set()

    async def submit(self, request: task_queue_pb2.SubmitTaskRequest) -> str:
        """The task's id once it is durable, as a lone SubmitTask call would give it."""
        if not self.enabled:
            return await self._send_one(request)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((request, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)
        outcome = await future
        if outcome is ALONE:
            return await self._send_one(request)
        if isinstance(outcome, RemoteError):
            raise outcome
        return outcome

    def _flush(self) -> None:
        waiting = [(request, future) for request, future in self._waiting if not future.done()]
        self._waiting = []
        if len(waiting) == 1:
            waiting[0][1].set_result(ALONE)  # nobody to share a call with
        elif waiting:
            call = asyncio.ensure_future(self._settle_chunks(waiting))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _settle_chunks(self, waiting: list[tuple[task_queue_pb2.SubmitTaskRequest, asyncio.Future]]) -> None:
        """One call per chunk, one after another (as submit_many sends them: measured
        faster than all at once, which has the server take thousands of submits together)."""
        futures = [future for _request, future in waiting]
        try:
            batch = Batch([request for request, _future in waiting], self.max_items, self.max_bytes)
            for chunk in batch.chunks():
                chunk_futures = [futures[i] for i in chunk]
                outcomes = await self._try_batch(batch.request(chunk)) if len(chunk) > 1 else None
                for future, outcome in zip(chunk_futures, outcomes or [ALONE] * len(chunk), strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:  # cancelled (the client closing): so are the submits still waiting
            for future in futures:
                future.cancel()

    async def _try_batch(self, request: task_queue_pb2.SubmitTasksRequest) -> list[object] | None:
        """Each item's outcome from one SubmitTasks try, or None if the call failed whole."""
        try:
            response, address = await self._send_batch(request)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:  # a server from before SubmitTasks
                self.enabled = False
            return None
        except Exception:  # e.g. the channel closed: each item's own call says what happened
            return None
        results = list(response.results)  # type: ignore[attr-defined]
        if len(results) != len(request.items):
            return None
        return [_outcome(result, address) for result in results]

    async def close(self) -> None:
        """Cancel the calls in flight (their submits are cancelled too)."""
        calls, self._calls = list(self._calls), set()
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def _outcome(result: task_queue_pb2.SubmitTasksResult, address: str) -> object:
    """An item's id, the RemoteError a lone submit would raise for it, or ALONE to retry it."""
    if result.code == 0:
        return result.task_id
    code = status_code(result.code)
    if code in SUBMIT_RETRY_CODES:
        return ALONE
    return RemoteError(code, result.message, address, None, parse_reason(result.reason))


#: A submit's state before its outcome: queued for a call, or in one.
_QUEUED, _TAKEN = object(), object()
#: Submit calls one qm.Client has in flight at once while threads wait to share the next
#: (a call from a thread that found none waiting is one of them).
MAX_THREAD_CALLS = 2


class ThreadSubmitBatcher:
    """Group commit of the submits of threads sharing a blocking client.

    `try_one(request)` and `try_batch(request)` make one try each: `try_one` returns the
    id, ALONE (a code a submit retries: the caller's full retrying path takes it), or
    raises RemoteError; `try_batch` returns `(response, address)` or raises grpc.RpcError.
    `submit` returns an id, a RemoteError to raise, or ALONE."""

    def __init__(
        self,
        try_one: Callable[[task_queue_pb2.SubmitTaskRequest], object],
        try_batch: Callable[[task_queue_pb2.SubmitTasksRequest], tuple[object, str]],
        max_items: int,
        max_bytes: int = MAX_BATCH_BYTES,
        max_calls: int = MAX_THREAD_CALLS,
    ):
        self._try_one = try_one
        self._try_batch = try_batch
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_calls = max_calls
        self.enabled = True  # False once a server answered SubmitTasks UNIMPLEMENTED
        self._changed = threading.Condition()
        self._waiting: list[list] = []  # [request, state or outcome] of queued submits, oldest first
        self._calls = 0

    def submit(self, request: task_queue_pb2.SubmitTaskRequest) -> object:
        slot: list = [request, _QUEUED]
        with self._changed:
            self._waiting.append(slot)
            while slot[1] is _QUEUED or slot[1] is _TAKEN:
                if slot[1] is _TAKEN or self._calls >= self.max_calls:
                    self._changed.wait()  # for a call to end: ours (taken by another thread) or any
                    continue
                taken = self._take()  # ours among them, unless more than a call's worth queued first
                outcomes: list[object] = [ALONE] * len(taken)
                self._calls += 1
                self._changed.release()
                try:
                    outcomes = self._send(taken)
                finally:
                    self._changed.acquire()
                    self._calls -= 1
                    for taken_slot, outcome in zip(taken, outcomes, strict=True):
                        taken_slot[1] = outcome
                    self._changed.notify_all()
        return slot[1]

    def _take(self) -> list[list]:
        """The oldest waiting submits that fit one call."""
        count = size = 0
        for request, _outcome in self._waiting:
            size += request.ByteSize() + 8
            if count and (count >= self.max_items or size > self.max_bytes or not self.enabled):
                break
            count += 1
        taken, self._waiting = self._waiting[:count], self._waiting[count:]
        for taken_slot in taken:
            taken_slot[1] = _TAKEN
        return taken

    def _send(self, taken: list[list]) -> list[object]:
        """Each taken submit's outcome from one try (ALONE where the try settled nothing)."""
        try:
            if len(taken) == 1:
                return [self._try_one(taken[0][0])]
            response, address = self._try_batch(task_queue_pb2.SubmitTasksRequest(items=[r for r, _o in taken]))
        except RemoteError as exc:  # try_one: refused for the item's own fault
            return [exc]
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:  # a server from before SubmitTasks
                self.enabled = False
            return [ALONE] * len(taken)
        except Exception:  # e.g. the channel closed: each submit's own call says what happened
            return [ALONE] * len(taken)
        results = list(response.results)  # type: ignore[attr-defined]
        if len(results) != len(taken):
            return [ALONE] * len(taken)
        return [_outcome(result, address) for result in results]
