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

Each call is one try. What it gives each submit is an `Outcome`: the task's id, or a
`Failed` (the code, details, retry hint and reason a lone SubmitTask would have met) that
the submit feeds to its own `Attempts`, as a lone submit does with an error: a code not
retried raises RemoteError at once, a code retried waits (the server's retry hint, or the
backoff) and the submit queues again, within `submit_retry_s`, with its idempotency key.
So a submit returns or raises what it would alone. ALONE: the batch could not be tried
(a server without SubmitTasks, which ends batching for the client, or an error outside
gRPC): the submit makes one try of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Awaitable, Callable, Union

import grpc

from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import MAX_BATCH_BYTES, Attempts, Batch, error_reason, retry_pushback_s, status_code
from qm.reasons import parse_reason


@dataclasses.dataclass(frozen=True)
class Failed:
    """One try of a submit that did not succeed: what `Attempts.failed` takes."""

    address: str
    code: grpc.StatusCode
    details: str
    retry_after_s: float | None = None
    reason: str | None = None

    @classmethod
    def of_call(cls, error: grpc.RpcError, address: str) -> "Failed":
        """The failure of a whole call (gRPC's error of a blocking or an asyncio call)."""
        code = error.code()
        details = error.details() or ""
        return cls(address, code, details, retry_pushback_s(error.trailing_metadata()), error_reason(error))

    def next_try_s(self, attempts: Attempts) -> float:
        """The pause before the submit's next try; RemoteError if there is none (a code
        not retried, or `submit_retry_s` spent), as for a lone submit."""
        return attempts.failed(self.address, self.code, self.details, self.retry_after_s, self.reason)


#: The batch could not be tried for this submit: it makes one try of its own.
ALONE = object()
#: What one try gives a submit: its id, a Failed, or ALONE.
Outcome = Union[str, Failed, object]


def item_outcomes(request: task_queue_pb2.SubmitTasksRequest, response, address: str) -> list[Outcome]:
    """Each item's outcome from a SubmitTasks response (ALONE for all if it does not fit)."""
    results = list(response.results)
    if len(results) != len(request.items):
        return [ALONE] * len(request.items)
    return [
        result.task_id
        if result.code == 0
        else Failed(address, status_code(result.code), result.message, None, parse_reason(result.reason))
        for result in results
    ]


class SubmitBatcher:
    """Collects a loop turn's submits and tries them with one call per chunk.

    `try_batch(request, address)` is one SubmitTasks call to `address` (what
    `current_address()` says when it starts): the response, or grpc.RpcError."""

    def __init__(
        self,
        try_batch: Callable[[task_queue_pb2.SubmitTasksRequest, str], Awaitable[object]],
        current_address: Callable[[], str],
        max_items: int,
        max_bytes: int = MAX_BATCH_BYTES,
    ):
        self._try_batch = try_batch
        self._current_address = current_address
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.enabled = True  # False once a server answered SubmitTasks UNIMPLEMENTED
        self._waiting: list[tuple[task_queue_pb2.SubmitTaskRequest, asyncio.Future]] = []
        self._calls: set[asyncio.Task] = set()

    async def submit(self, request: task_queue_pb2.SubmitTaskRequest) -> Outcome:
        """The outcome of this turn's try for the submit (ALONE: alone in its turn)."""
        if not self.enabled:
            return ALONE
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((request, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        waiting = [(request, future) for request, future in self._waiting if not future.done()]
        self._waiting = []
        if len(waiting) == 1:
            waiting[0][1].set_result(ALONE)  # nobody to share a call with
        elif waiting:
            call = asyncio.ensure_future(self._try_chunks(waiting))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _try_chunks(self, waiting: list[tuple[task_queue_pb2.SubmitTaskRequest, asyncio.Future]]) -> None:
        """One call per chunk, one after another (as submit_many sends them: measured
        faster than all at once, which has the server take thousands of submits together)."""
        futures = [future for _request, future in waiting]
        try:
            batch = Batch([request for request, _future in waiting], self.max_items, self.max_bytes)
            for chunk in batch.chunks():
                outcomes = await self._try(batch.request(chunk)) if len(chunk) > 1 else [ALONE]
                for index, outcome in zip(chunk, outcomes, strict=True):
                    if not futures[index].done():
                        futures[index].set_result(outcome)
        finally:  # cancelled (the client closing): so are the submits still waiting
            for future in futures:
                future.cancel()

    async def _try(self, request: task_queue_pb2.SubmitTasksRequest) -> list[Outcome]:
        address = self._current_address()
        try:
            response = await self._try_batch(request, address)
        except grpc.RpcError as exc:
            return _call_failed(self, exc, address, len(request.items))
        except Exception:  # e.g. the channel closed: each submit's own try says what happened
            return [ALONE] * len(request.items)
        return item_outcomes(request, response, address)

    async def close(self) -> None:
        """Cancel the calls in flight (their submits are cancelled too)."""
        calls, self._calls = list(self._calls), set()
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def _call_failed(batcher, error: grpc.RpcError, address: str, items: int) -> list[Outcome]:
    """Every item's outcome when a SubmitTasks call failed whole."""
    if error.code() is grpc.StatusCode.UNIMPLEMENTED:  # a server from before SubmitTasks
        batcher.enabled = False
        return [ALONE] * items
    return [Failed.of_call(error, address)] * items


#: A submit's state before its outcome: queued for a call, or in one.
_QUEUED, _TAKEN = object(), object()
#: Submit calls one qm.Client has in flight at once while threads wait to share the next
#: (a call from a thread that found none waiting is one of them).
MAX_THREAD_CALLS = 2


class ThreadSubmitBatcher:
    """Group commit of the submits of threads sharing a blocking client.

    `try_one(request, address)` and `try_batch(request, address)` make one call each, to
    `address` (`current_address()` when the call starts): `try_one` returns the task's id,
    both raise grpc.RpcError."""

    def __init__(
        self,
        try_one: Callable[[task_queue_pb2.SubmitTaskRequest, str], str],
        try_batch: Callable[[task_queue_pb2.SubmitTasksRequest, str], object],
        current_address: Callable[[], str],
        max_items: int,
        max_bytes: int = MAX_BATCH_BYTES,
        max_calls: int = MAX_THREAD_CALLS,
    ):
        self._try_one = try_one
        self._try_batch = try_batch
        self._current_address = current_address
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_calls = max_calls
        self.enabled = True  # False once a server answered SubmitTasks UNIMPLEMENTED
        self._changed = threading.Condition()
        self._waiting: list[list] = []  # [request, state or outcome] of queued submits, oldest first
        self._calls = 0

    def submit(self, request: task_queue_pb2.SubmitTaskRequest) -> Outcome:
        """The outcome of one try for the submit, alone or in another thread's call."""
        slot: list = [request, _QUEUED]
        with self._changed:
            self._waiting.append(slot)
            while slot[1] is _QUEUED or slot[1] is _TAKEN:
                if slot[1] is _TAKEN or self._calls >= self.max_calls:
                    self._changed.wait()  # for a call to end: ours (taken by another thread) or any
                    continue
                taken = self._take()  # ours among them, unless more than a call's worth queued first
                outcomes: list[Outcome] = [ALONE] * len(taken)
                self._calls += 1
                self._changed.release()
                try:
                    outcomes = self._try(taken)
                finally:
                    self._changed.acquire()
                    self._calls -= 1
                    for taken_slot, outcome in zip(taken, outcomes, strict=True):
                        taken_slot[1] = outcome
                    self._changed.notify_all()
        return slot[1]

    def _take(self) -> list[list]:
        """The oldest queued submits that fit one call."""
        requests = [request for request, _state in self._waiting]
        first = next(Batch(requests, self.max_items if self.enabled else 1, self.max_bytes).chunks())
        taken, self._waiting = self._waiting[: len(first)], self._waiting[len(first) :]
        for taken_slot in taken:
            taken_slot[1] = _TAKEN
        return taken

    def _try(self, taken: list[list]) -> list[Outcome]:
        address = self._current_address()
        requests = [request for request, _state in taken]
        try:
            if len(requests) == 1:
                return [self._try_one(requests[0], address)]
            request = task_queue_pb2.SubmitTasksRequest(items=requests)
            return item_outcomes(request, self._try_batch(request, address), address)
        except grpc.RpcError as exc:
            if len(requests) == 1:
                return [Failed.of_call(exc, address)]
            return _call_failed(self, exc, address, len(requests))
        except Exception:  # e.g. the channel closed: each submit's own try says what happened
            return [ALONE] * len(requests)
