"""qm.Client: the blocking Python client of qm-server (and what the `qm` command uses).

    with qm.Client(server="127.0.0.1:50051") as client:
        task_id = client.submit("math", "1 + 2 * 5")
        print(client.result(task_id, timeout_s=30))   # 11

`server` may name several servers, "a:50051,b:50051": every call fails over between them.
Waits (result, watch, results) ride out a server restart: see qm/client/common.py, which
holds everything this client shares with the asyncio one (qm.aio.Client).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Iterator, Sequence

import grpc

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.client.common import (
    CHANNEL_OPTIONS,
    DEFAULT_BATCH_ITEMS,
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_RECONNECT_S,
    DEFAULT_SUBMIT_RETRY_S,
    FAILOVER_CODES,
    FOLLOW_IDS_PER_STREAM,
    SUBMIT_RETRY_CODES,
    TERMINAL_STATE_NAMES,
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
from qm.client.submit_batching import ALONE, Failed, ThreadSubmitBatcher
from qm.errors import WaitTimeout
from qm.reasons import Reason
from qm.states import TaskState

__all__ = [
    "Client",
    "DeadLetter",
    "GroupStatus",
    "Reason",
    "RemoteError",
    "Schedule",
    "TaskState",
    "TaskStatus",
    "TaskTypeInfo",
    "WaitTimeout",
    "WorkerInfo",
    "TERMINAL_STATE_NAMES",
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_SUBMIT_RETRY_S",
    "DEFAULT_RECONNECT_S",
    "SUBMIT_RETRY_CODES",
    "retry_pushback_s",
    "status_from_proto",
]


class Client:
    """Connections to one or more qm-servers; close it (or use `with`). Thread-safe.

    call_timeout_s: deadline of each unary call. submit_retry_s: how long submit and
    submit_many keep retrying (same idempotency keys) while no server or broker is
    available. reconnect_s: how long a wait that has reached a server keeps reconnecting
    while none answers. batch_items: items per SubmitTasks call. tls_ca: PEM file of the CA
    that signed the servers' certificates (TLS; else plaintext); tls_cert/tls_key: this
    client's certificate for mTLS; token: a bearer token (`qm token create`).
    batch_submits: threads that submit at once share SubmitTasks calls, each answered as
    it would be alone (qm/client/submit_batching.py); False: every submit its own call.
    stream_ids: most task ids one results stream follows; a wait over more (watch, results)
    takes one stream after another (10,000, the servers' default server.max_stream_ids).
    A server that allows fewer refuses the stream naming its limit; the client then uses
    that (its `stream_ids` drops to it) and goes on.
    """

    def __init__(
        self,
        server: str | Sequence[str] = "127.0.0.1:50051",
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        submit_retry_s: float = DEFAULT_SUBMIT_RETRY_S,
        reconnect_s: float = DEFAULT_RECONNECT_S,
        batch_items: int = DEFAULT_BATCH_ITEMS,
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
        self._channels: dict[str, tuple[grpc.Channel, task_queue_pb2_grpc.TaskQueueStub]] = {}
        self._lock = threading.Lock()
        self._batcher = ThreadSubmitBatcher(
            self._submit_try, self._submit_batch_try, lambda: self._failover.current, batch_items
        )
        self._batcher.enabled = batch_submits

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel, _stub in channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _stub_at(self, address: str) -> task_queue_pb2_grpc.TaskQueueStub:
        with self._lock:
            if address not in self._channels:
                channel = self._security.channel(address, CHANNEL_OPTIONS)
                self._channels[address] = (channel, task_queue_pb2_grpc.TaskQueueStub(channel))
            return self._channels[address][1]

    @property
    def _stub(self) -> task_queue_pb2_grpc.TaskQueueStub:
        """The stub of the server calls go to now (qm.Executor opens its stream on it)."""
        return self._stub_at(self._failover.current)

    def _call(self, method: str, request, window_s: float = 0.0, retry_codes: frozenset = FAILOVER_CODES):
        """A unary call, failing over between the servers on UNAVAILABLE (and retrying
        `retry_codes`) for `window_s`."""
        attempts = Attempts(self._failover, window_s, retry_codes=retry_codes)
        while True:
            address = attempts.address
            try:
                stub_method = getattr(self._stub_at(address), method)
                response = stub_method(request, timeout=self.call_timeout_s, wait_for_ready=False)
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
            time.sleep(delay_s)

    # -- submitting ----------------------------------------------------------------------

    def submit(
        self,
        type: str,
        payload: Any,
        *,
        queue: str = "",
        timeout_s: float = 0.0,
        memory_limit_mb: int = 0,
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retry_jitter: bool | None = None,
        retry_on_timeout: bool | None = None,
        idempotency_key: str | None = None,
        soft_timeout_s: float = 0.0,
        delay_s: float | None = None,
        not_before: float | None = None,
        priority: int | None = None,
        cpus: int = 0,
    ) -> str:
        """Submit a task; returns its id once the server has made it durable.

        `delay_s` (seconds from now) or `not_before` (seconds since the epoch; one already
        past runs now), not both: the task is SCHEDULED, held in RabbitMQ, until then.
        `priority` 0 (lowest) to 9 (highest): among the tasks of its queue waiting for a
        worker, higher ones start first; None = the task type's default, else 5.

        Limits and retry options left at 0/None take the task type's, else the server's
        defaults; `soft_timeout_s` is when the task gets qm.SoftTimeout (0: the type's, else
        none). Every submit carries an idempotency key (a fresh one unless given), so while
        the server or its broker is UNAVAILABLE, the server is overloaded
        (RESOURCE_EXHAUSTED: after its retry hint), or a call ends CANCELLED or
        DEADLINE_EXCEEDED, the client retries with the same key, on each server address in
        turn, for up to `submit_retry_s`, and a retry can never enqueue the task twice. A key
        already used for another request: RemoteError FAILED_PRECONDITION.

        `cpus`: CPU slots the task takes on a worker (0: the type's, else 1); the task may
        use that many threads or processes (qm.task_cpus()). More than any live worker of
        the queue has (its --procs): RemoteError FAILED_PRECONDITION, reason NO_WORKER_FITS.
        """
        request = submit_request(
            type,
            payload,
            queue=queue,
            timeout_s=timeout_s,
            memory_limit_mb=memory_limit_mb,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
            retry_jitter=retry_jitter,
            retry_on_timeout=retry_on_timeout,
            idempotency_key=idempotency_key,
            soft_timeout_s=soft_timeout_s,
            delay_s=delay_s,
            not_before=not_before,
            priority=priority,
            cpus=cpus,
        )
        attempts = Attempts(self._failover, self.submit_retry_s, retry_codes=SUBMIT_RETRY_CODES)
        while True:
            outcome = self._batcher.submit(request) if self._batcher.enabled else ALONE
            if not isinstance(outcome, (str, Failed)):  # ALONE: no batch tried for it
                outcome = self._submit_once(request)
            if isinstance(outcome, str):
                return outcome
            time.sleep(outcome.next_try_s(attempts))

    def _submit_once(self, request: task_queue_pb2.SubmitTaskRequest) -> str | Failed:
        address = self._failover.current
        try:
            return self._submit_try(request, address)
        except grpc.RpcError as exc:
            return Failed.of_call(exc, address)

    def _submit_try(self, request: task_queue_pb2.SubmitTaskRequest, address: str) -> str:
        """One SubmitTask call (raises grpc.RpcError)."""
        response = self._stub_at(address).SubmitTask(request, timeout=self.call_timeout_s, wait_for_ready=False)
        self._failover.reached = True
        return response.task_id

    def _submit_batch_try(
        self, request: task_queue_pb2.SubmitTasksRequest, address: str
    ) -> task_queue_pb2.SubmitTasksResponse:
        """One SubmitTasks call (ThreadSubmitBatcher's try; raises grpc.RpcError)."""
        response = self._stub_at(address).SubmitTasks(request, timeout=self.call_timeout_s)
        self._failover.reached = True
        return response

    def submit_many(self, items: Iterable[tuple], **options) -> list[str]:
        """Submit many tasks in SubmitTasks calls of `batch_items`; their ids, in order.

        Items are `(type, payload)` or `(type, payload, {option: value})`; `options` are
        submit's keyword options, for every item (an item's own win). A batch
        `idempotency_key` K gives item i the key "K/i": sending the same batch again is
        harmless. If any item is refused, qm.errors.BatchError names each refused item and
        why; the accepted items are durable and their ids are on the error (`task_ids`).
        """
        batch = Batch(batch_requests(items, options), self.batch_items)
        try:
            for chunk in batch.chunks():
                self._submit_chunk(batch, chunk)
        except RemoteError as exc:
            batch.give_up(exc)
        return batch.task_ids_or_raise()

    def _submit_chunk(self, batch: Batch, chunk: list[int]) -> None:
        attempts = Attempts(self._failover, self.submit_retry_s, retry_codes=SUBMIT_RETRY_CODES)
        while True:
            address = attempts.address
            try:
                response = self._stub_at(address).SubmitTasks(batch.request(chunk), timeout=self.call_timeout_s)
                self._failover.reached = True
                chunk = batch.record(chunk, response)
                if not chunk:
                    return
                refused = batch.refused[chunk[0]]
                code, details, hint, reason = grpc.StatusCode.UNAVAILABLE, refused.message, None, refused.reason
            except grpc.RpcError as exc:
                code, details, reason = exc.code(), exc.details() or "", error_reason(exc)
                hint = retry_pushback_s(exc.trailing_metadata())
            time.sleep(attempts.failed(address, code, details, hint, reason))

    def submit_group(
        self, items: Iterable[tuple], then: tuple | None = None, *, idempotency_key: str | None = None, **options
    ) -> str:
        """Submit a group of tasks with an optional callback task; returns the group id once
        every member is durable.

        `items` as submit_many's: `(type, payload)` or `(type, payload, {option: value})`,
        `options` for every member (the callback takes their `queue`). `then` = `(type,
        payload[, {option: value}])`: the callback, run once after every member reached a
        terminal state (failed or cancelled ones count), with a JSON document as its
        payload: {"group_id", "payload" (then's payload), "task_ids", "results" (member
        order; null where a member did not succeed), "failures", "succeeded", "failed",
        "results_omitted"} (see docs/architecture.md, "Groups"). One group idempotency
        key (fresh unless given): retried like submit, a retry never makes a second group.
        Members and callback take no key of their own. group_status(group_id) shows the
        counts and the member ids.
        """
        return self.submit_group_request(group_request(items, then, options, idempotency_key)).group_id

    def submit_group_request(self, request: task_queue_pb2.SubmitGroupRequest) -> task_queue_pb2.SubmitGroupResponse:
        """SubmitGroup as is (retried as submit_group): the response has the member ids too."""
        return self._call("SubmitGroup", request, self.submit_retry_s, SUBMIT_RETRY_CODES)

    def group_status(self, group_id: str) -> GroupStatus:
        """Members per state, the member ids and the callback's id and state
        (RemoteError NOT_FOUND, reason GROUP_NOT_FOUND, for an unknown id)."""
        request = task_queue_pb2.GetGroupStatusRequest(group_id=group_id)
        return group_status_from_proto(self._call("GetGroupStatus", request).status)

    # -- following -----------------------------------------------------------------------

    def watch(self, task_ids: Iterable[str], timeout_s: float | None = None) -> Iterator[TaskStatus]:
        """Each task's current state, then every change as it happens, until all are
        terminal. Survives a server restart or the loss of one of several servers: the
        stream is opened again (for `reconnect_s` at most without any server) and no state
        is delivered twice. At `timeout_s`: WaitTimeout (a TimeoutError) naming the ids
        still not finished."""
        return self._follow(task_ids, timeout_s, final_only=False)

    def _follow(self, task_ids: Iterable[str], timeout_s: float | None, final_only: bool) -> Iterator[TaskStatus]:
        follow = Follow(
            task_ids, self._failover, timeout_s, self.reconnect_s, final_only=final_only, stream_ids=self.stream_ids
        )
        while not follow.done:
            address = follow.address
            call = self._stub_at(address).StreamTaskResults(iter(follow.requests()), timeout=follow.call_timeout())
            code = details = reason = limit = None
            try:
                for response in call:
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
            time.sleep(follow.interrupted(address, code, details, reason, limit))
            self.stream_ids = min(self.stream_ids, follow.stream_ids)  # a server's lower limit, learnt

    def results(self, task_ids: Iterable[str], timeout_s: float | None = None) -> Iterator[TaskStatus]:
        """The final status of each task as it finishes (over one stream per `stream_ids`
        ids, resumed like watch): `.state`, `.result` or `.error`. At `timeout_s`: WaitTimeout. The server sends
        final states only (StreamTaskResultsRequest.final_only)."""
        for status in self._follow(task_ids, timeout_s, final_only=True):
            if status.terminal:  # a server older than final_only sends every state
                yield status

    def result(self, task_id: str, timeout_s: float | None = None) -> Any:
        """Wait for the task; return its result, or raise TaskError (or WaitTimeout)."""
        finals = list(self.results([task_id], timeout_s))
        return final_value(task_id, finals[-1] if finals else None)

    # -- one call each -------------------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus:
        request = task_queue_pb2.GetTaskStatusRequest(task_id=task_id)
        return status_from_proto(self._call("GetTaskStatus", request).status)

    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a task (RemoteError FAILED_PRECONDITION if it already ended)."""
        request = task_queue_pb2.CancelTaskRequest(task_id=task_id)
        return status_from_proto(self._call("CancelTask", request).status)

    def workers(self) -> list[WorkerInfo]:
        """Workers the server has heard from, with state active, draining, stopped or lost."""
        return workers_from_proto(self._call("ListWorkers", task_queue_pb2.ListWorkersRequest()))

    def task_types(self) -> tuple[list[TaskTypeInfo], list[str]]:
        """The task types the server accepts (name, codec, limits, description) and the
        plugins that failed to load there."""
        return task_types_from_proto(self._call("ListTaskTypes", task_queue_pb2.ListTaskTypesRequest()))

    def dead_letters(self, limit: int = 100) -> tuple[list[DeadLetter], int]:
        """Dead-lettered tasks (oldest first, at most `limit`) and how many there are."""
        request = task_queue_pb2.ListDeadLettersRequest(limit=limit)
        return dead_letters_from_proto(self._call("ListDeadLetters", request))

    def requeue_dead_letters(self, task_ids: Iterable[str] = (), all: bool = False) -> dict[str, str]:
        """Run dead letters again as new tasks; returns dead task id → new task id."""
        request = task_queue_pb2.RequeueDeadLettersRequest(task_ids=list(task_ids), all=all)
        return dict(self._call("RequeueDeadLetters", request).new_task_ids)

    def purge_dead_letters(self) -> int:
        return self._call("PurgeDeadLetters", task_queue_pb2.PurgeDeadLettersRequest()).purged

    # -- periodic schedules ----------------------------------------------------------------

    def add_schedule(self, type: str, payload: Any, **options) -> Schedule:
        """Add a periodic schedule: `cron="*/5 * * * *"` (5 fields; 6 with seconds first) or
        `every_s=S`, `timezone` (IANA, default UTC), `missed` ("coalesce", the default, or
        "skip"), `schedule_id` (default a fresh one), and the task's options as submit takes
        them (queue, limits, retries). Retried like a submit: the id makes it one schedule."""
        request = add_schedule_request(type, payload, **options)
        response = self._call("AddSchedule", request, self.submit_retry_s, SUBMIT_RETRY_CODES)
        return schedule_from_proto(response.schedule)

    def list_schedules(self) -> list[Schedule]:
        """Every schedule of the server's store, by id."""
        found: list[Schedule] = []
        token = ""
        while True:
            request = task_queue_pb2.ListSchedulesRequest(page_token=token)
            page = self._call("ListSchedules", request)
            found += [schedule_from_proto(schedule) for schedule in page.schedules]
            token = page.next_page_token
            if not token:
                return found

    def remove_schedule(self, schedule_id: str) -> Schedule:
        """Remove a schedule (RemoteError NOT_FOUND, reason SCHEDULE_NOT_FOUND, if there is none)."""
        request = task_queue_pb2.RemoveScheduleRequest(schedule_id=schedule_id)
        return schedule_from_proto((self._call("RemoveSchedule", request)).schedule)
