"""qm.aio.Client: the asyncio client of qm-server (grpc.aio), with qm.Client's methods.

    async with qm.aio.Client(server="127.0.0.1:50051") as client:
        task_id = await client.submit("math", "1 + 2 * 5")
        print(await client.result(task_id, timeout_s=30))   # 11
        async for status in client.watch([task_id]):
            print(status.state)

Requests, conversions, errors, retries, failover and the resume of waits are the pieces
of qm/client/common.py that qm.Client uses too; this module only awaits where that one
blocks. Channels open on first use, on the running event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterable, Sequence

import grpc

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.client.common import (
    CHANNEL_OPTIONS,
    DEFAULT_BATCH_ITEMS,
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RECONNECT_S,
    DEFAULT_SUBMIT_RETRY_S,
    FAILOVER_CODES,
    FOLLOW_IDS_PER_STREAM,
    SUBMIT_RETRY_CODES,
    Attempts,
    Batch,
    DeadLetter,
    Failover,
    Follow,
    GroupStatus,
    RemoteError,
    Schedule,
    TaskStatus,
    TaskTypeInfo,
    WorkerInfo,
    add_schedule_request,
    batch_requests,
    dead_letters_from_proto,
    error_reason,
    final_value,
    group_request,
    group_status_from_proto,
    parse_servers,
    response_statuses,
    retry_pushback_s,
    schedule_from_proto,
    status_from_proto,
    stream_error,
    submit_request,
    task_types_from_proto,
    workers_from_proto,
)
from qm.client.credentials import ChannelSecurity
from qm.client.submit_batching import Failed, SubmitBatcher


class Client:
    """Connections to one or more qm-servers for one event loop; `async with` it, or
    `await close()`. Same options and methods as qm.Client, awaited; `max_in_flight`
    bounds the unary calls in flight at once (the rest wait their turn). Submits made in
    the same loop turn (asyncio.gather over many) go out as one SubmitTasks call per
    `batch_items`, each answered as it would be alone (qm/client/submit_batching.py);
    `batch_submits=False` sends every submit as its own call."""

    def __init__(
        self,
        server: str | Sequence[str] = "127.0.0.1:50051",
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        submit_retry_s: float = DEFAULT_SUBMIT_RETRY_S,
        reconnect_s: float = DEFAULT_RECONNECT_S,
        batch_items: int = DEFAULT_BATCH_ITEMS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        *,
        tls_ca: str | None = None,
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        batch_submits: bool = True,
        stream_ids: int = FOLLOW_IDS_PER_STREAM,
    ):
        self.servers = parse_servers(server)
        self._security = ChannelSecurity.load(tls_ca, token, tls_cert, tls_key)
        self.server = ",".join(self.servers)
        self.call_timeout_s = call_timeout_s
        self.submit_retry_s = submit_retry_s
        self.reconnect_s = reconnect_s
        self.batch_items = batch_items
        self.stream_ids = stream_ids  # most ids one results stream follows (server.max_stream_ids)
        self._failover = Failover(self.servers)
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._channels: dict[str, tuple[grpc.aio.Channel, task_queue_pb2_grpc.TaskQueueStub]] = {}
        self._batcher = SubmitBatcher(self._submit_batch_once, lambda: self._failover.current, batch_items)
        self._batcher.enabled = batch_submits

    async def close(self) -> None:
        await self._batcher.close()
        channels, self._channels = list(self._channels.values()), {}
        for channel, _stub in channels:
            await channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _stub_at(self, address: str) -> task_queue_pb2_grpc.TaskQueueStub:
        if address not in self._channels:
            channel = self._security.aio_channel(address, CHANNEL_OPTIONS)
            self._channels[address] = (channel, task_queue_pb2_grpc.TaskQueueStub(channel))
        return self._channels[address][1]

    async def _call(self, method: str, request, window_s: float = 0.0, retry_codes: frozenset = FAILOVER_CODES):
        """A unary call, failing over between the servers on UNAVAILABLE (and retrying
        `retry_codes`) for `window_s`."""
        attempts = Attempts(self._failover, window_s, retry_codes=retry_codes)
        while True:
            address = attempts.address
            try:
                stub_method = getattr(self._stub_at(address), method)
                async with self._in_flight:
                    response = await stub_method(request, timeout=self.call_timeout_s, wait_for_ready=False)
                attempts.reached()
                return response
            except grpc.RpcError as exc:
                delay_s = attempts.failed(
                    address,
                    exc.code(),
                    exc.details() or "",
                    retry_pushback_s(exc.trailing_metadata()),
                    error_reason(exc),
                )
            await asyncio.sleep(delay_s)

    # -- submitting ----------------------------------------------------------------------

    async def submit(self, type: str, payload: Any, **options) -> str:
        """qm.Client.submit, awaited: the task's id once it is durable."""
        request = submit_request(type, payload, **options)
        attempts = Attempts(self._failover, self.submit_retry_s, retry_codes=SUBMIT_RETRY_CODES)
        while True:
            outcome = await self._batcher.submit(request)
            if not isinstance(outcome, (str, Failed)):  # ALONE: no batch tried for it
                outcome = await self._submit_once(request)
            if isinstance(outcome, str):
                return outcome
            await asyncio.sleep(outcome.next_try_s(attempts))

    async def _submit_once(self, request: task_queue_pb2.SubmitTaskRequest) -> str | Failed:
        address = self._failover.current
        try:
            async with self._in_flight:
                response = await self._stub_at(address).SubmitTask(
                    request, timeout=self.call_timeout_s, wait_for_ready=False
                )
        except grpc.RpcError as exc:
            return Failed.of_call(exc, address)
        self._failover.reached = True
        return response.task_id

    async def _submit_batch_once(
        self, request: task_queue_pb2.SubmitTasksRequest, address: str
    ) -> task_queue_pb2.SubmitTasksResponse:
        """One SubmitTasks call (SubmitBatcher's try)."""
        async with self._in_flight:
            response = await self._stub_at(address).SubmitTasks(request, timeout=self.call_timeout_s)
        self._failover.reached = True
        return response

    async def submit_many(self, items: Iterable[tuple], **options) -> list[str]:
        """qm.Client.submit_many, awaited: the ids in order, or qm.errors.BatchError."""
        batch = Batch(batch_requests(items, options), self.batch_items)
        try:
            for chunk in batch.chunks():
                await self._submit_chunk(batch, chunk)
        except RemoteError as exc:
            batch.give_up(exc)
        return batch.task_ids_or_raise()

    async def _submit_chunk(self, batch: Batch, chunk: list[int]) -> None:
        attempts = Attempts(self._failover, self.submit_retry_s, retry_codes=SUBMIT_RETRY_CODES)
        while True:
            address = attempts.address
            try:
                async with self._in_flight:
                    response = await self._stub_at(address).SubmitTasks(
                        batch.request(chunk), timeout=self.call_timeout_s
                    )
                self._failover.reached = True
                chunk = batch.record(chunk, response)
                if not chunk:
                    return
                refused = batch.refused[chunk[0]]
                code, details, hint, reason = grpc.StatusCode.UNAVAILABLE, refused.message, None, refused.reason
            except grpc.RpcError as exc:
                code, details, reason = exc.code(), exc.details() or "", error_reason(exc)
                hint = retry_pushback_s(exc.trailing_metadata())
            await asyncio.sleep(attempts.failed(address, code, details, hint, reason))

    # -- following -----------------------------------------------------------------------

    async def watch(self, task_ids: Iterable[str], timeout_s: float | None = None) -> AsyncIterator[TaskStatus]:
        """qm.Client.watch as an async iterator: resumed across server restarts and
        failover, no state delivered twice, WaitTimeout at `timeout_s`."""
        async for status in self._follow(task_ids, timeout_s, final_only=False):
            yield status

    async def _follow(
        self, task_ids: Iterable[str], timeout_s: float | None, final_only: bool
    ) -> AsyncIterator[TaskStatus]:
        follow = Follow(
            task_ids, self._failover, timeout_s, self.reconnect_s, final_only=final_only, stream_ids=self.stream_ids
        )
        while not follow.done:
            address = follow.address
            call = self._stub_at(address).StreamTaskResults(follow.requests(), timeout=follow.call_timeout())
            code = details = reason = limit = None
            try:
                async for response in call:
                    for proto in response_statuses(response):
                        status = follow.accept(proto)
                        if status is not None:
                            yield status
            except grpc.RpcError as exc:
                code, details, reason, limit = stream_error(exc)
            finally:
                call.cancel()
            if follow.done or (code is None and follow.window_done):
                continue  # finished, or the stream followed its share of the ids: the next one
            await asyncio.sleep(follow.interrupted(address, code, details, reason, limit))
            self.stream_ids = min(self.stream_ids, follow.stream_ids)  # a server's lower limit, learnt

    async def results(self, task_ids: Iterable[str], timeout_s: float | None = None) -> AsyncIterator[TaskStatus]:
        """The final status of each task as it finishes, over one (resumed) stream per
        `stream_ids` ids; the server sends final states only."""
        async for status in self._follow(task_ids, timeout_s, final_only=True):
            if status.terminal:  # a server older than final_only sends every state
                yield status

    async def result(self, task_id: str, timeout_s: float | None = None) -> Any:
        """Wait for the task; return its result, or raise TaskError (or WaitTimeout)."""
        finals = [status async for status in self.results([task_id], timeout_s)]
        return final_value(task_id, finals[-1] if finals else None)

    async def submit_group(
        self, items: Iterable[tuple], then: tuple | None = None, *, idempotency_key: str | None = None, **options
    ) -> str:
        """qm.Client.submit_group, awaited: the group id once every member is durable."""
        request = group_request(items, then, options, idempotency_key)
        return (await self._call("SubmitGroup", request, self.submit_retry_s, SUBMIT_RETRY_CODES)).group_id

    async def group_status(self, group_id: str) -> GroupStatus:
        """qm.Client.group_status, awaited."""
        request = task_queue_pb2.GetGroupStatusRequest(group_id=group_id)
        return group_status_from_proto((await self._call("GetGroupStatus", request)).status)

    # -- one call each -------------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus:
        request = task_queue_pb2.GetTaskStatusRequest(task_id=task_id)
        return status_from_proto((await self._call("GetTaskStatus", request)).status)

    async def cancel(self, task_id: str) -> TaskStatus:
        request = task_queue_pb2.CancelTaskRequest(task_id=task_id)
        return status_from_proto((await self._call("CancelTask", request)).status)

    async def workers(self) -> list[WorkerInfo]:
        return workers_from_proto(await self._call("ListWorkers", task_queue_pb2.ListWorkersRequest()))

    async def task_types(self) -> tuple[list[TaskTypeInfo], list[str]]:
        return task_types_from_proto(await self._call("ListTaskTypes", task_queue_pb2.ListTaskTypesRequest()))

    async def dead_letters(self, limit: int = 100) -> tuple[list[DeadLetter], int]:
        request = task_queue_pb2.ListDeadLettersRequest(limit=limit)
        return dead_letters_from_proto(await self._call("ListDeadLetters", request))

    async def requeue_dead_letters(self, task_ids: Iterable[str] = (), all: bool = False) -> dict[str, str]:
        request = task_queue_pb2.RequeueDeadLettersRequest(task_ids=list(task_ids), all=all)
        return dict((await self._call("RequeueDeadLetters", request)).new_task_ids)

    async def purge_dead_letters(self) -> int:
        return (await self._call("PurgeDeadLetters", task_queue_pb2.PurgeDeadLettersRequest())).purged

    # -- periodic schedules ----------------------------------------------------------------

    async def add_schedule(self, type: str, payload: Any, **options) -> Schedule:
        """Add a periodic schedule: `cron="*/5 * * * *"` (5 fields; 6 with seconds first) or
        `every_s=S`, `timezone` (IANA, default UTC), `missed` ("coalesce", the default, or
        "skip"), `schedule_id` (default a fresh one), and the task's options as submit takes
        them (queue, limits, retries). Retried like a submit: the id makes it one schedule."""
        request = add_schedule_request(type, payload, **options)
        response = await self._call("AddSchedule", request, self.submit_retry_s, SUBMIT_RETRY_CODES)
        return schedule_from_proto(response.schedule)

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule of the server's store, by id."""
        found: list[Schedule] = []
        token = ""
        while True:
            request = task_queue_pb2.ListSchedulesRequest(page_token=token)
            page = await self._call("ListSchedules", request)
            found += [schedule_from_proto(schedule) for schedule in page.schedules]
            token = page.next_page_token
            if not token:
                return found

    async def remove_schedule(self, schedule_id: str) -> Schedule:
        """Remove a schedule (RemoteError NOT_FOUND, reason SCHEDULE_NOT_FOUND, if there is none)."""
        request = task_queue_pb2.RemoveScheduleRequest(schedule_id=schedule_id)
        return schedule_from_proto((await self._call("RemoveSchedule", request)).schedule)
