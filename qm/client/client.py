"""qm.Client: the Python client of qm-server (and what the `qm` command uses).

    with qm.Client(server="127.0.0.1:50051") as client:
        task_id = client.submit("math", "1 + 2 * 5")
        print(client.result(task_id, timeout_s=30))   # 11
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, Iterable, Iterator

import grpc

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.codecs import decode_result, encode_payload
from qm.errors import QMError, TaskError
from qm.states import state_name

#: Deadline of unary calls (submit, status).
DEFAULT_CALL_TIMEOUT_S = 30.0
#: How long submit keeps retrying while the server or broker is UNAVAILABLE.
DEFAULT_SUBMIT_RETRY_S = 30.0
SUBMIT_RETRY_INITIAL_DELAY_S = 0.2
SUBMIT_RETRY_MAX_DELAY_S = 2.0
#: Codes a submit is retried on, always with the same idempotency key (so never enqueued
#: twice): the server or its broker unreachable, the server overloaded (RESOURCE_EXHAUSTED,
#: with a retry-pushback-ms hint), or a call that ended without an answer (CANCELLED,
#: DEADLINE_EXCEEDED: the task may or may not have been accepted; the key settles it).
SUBMIT_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Trailing metadata key of the server's retry hint, in milliseconds.
RETRY_PUSHBACK_KEY = "retry-pushback-ms"


def retry_pushback_s(trailing_metadata) -> float | None:
    """The server's retry hint in seconds (from `retry-pushback-ms`), or None."""
    for key, value in trailing_metadata or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


class RemoteError(QMError):
    """qm-server answered with an error status (or could not be reached)."""

    def __init__(self, code: grpc.StatusCode, details: str, server: str, retry_after_s: float | None = None):
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s  # the server's retry hint, if it gave one
        # UNAVAILABLE from qm-server itself names RabbitMQ/the broker ("RabbitMQ at ... is
        # unreachable", "connection to RabbitMQ at ... lost"); anything else is gRPC failing
        # to reach qm-server.
        if code is grpc.StatusCode.UNAVAILABLE and not _names_broker(details):
            details = (f"cannot reach qm-server at {server} ({details}); is it running? "
                       "Point --server / QM_CLIENT__SERVER at it")
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"qm-server at {server} did not answer in time ({details})"
        super().__init__(details)


def _names_broker(details: str) -> bool:
    text = details.lower()
    return "broker" in text or "rabbitmq" in text


@dataclasses.dataclass(frozen=True)
class TaskStatus:
    """A task's state as the server reports it; times are seconds since the epoch or None."""

    task_id: str
    type: str
    queue: str
    state: str
    attempts: int
    result: Any
    error: str
    worker: str
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    timeout_s: float = 0.0         # effective hard time limit
    memory_limit_mb: int = 0       # effective memory limit; 0 = none
    max_retries: int = 0           # effective retry budget
    next_attempt_at: float | None = None  # while RETRYING

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATE_NAMES

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {"id": data.pop("task_id"), **data}
        if isinstance(self.result, bytes):
            data["result"] = self.result.hex()
        return data


TERMINAL_STATE_NAMES = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "MEMORY_EXCEEDED", "CRASHED",
                                  "CANCELLED"})


def _seconds(timestamp) -> float | None:
    return timestamp.ToNanoseconds() / 1e9 if timestamp.ByteSize() else None


def status_from_proto(status: task_queue_pb2.TaskStatus) -> TaskStatus:
    return TaskStatus(
        task_id=status.task_id, type=status.type, queue=status.queue,
        state=state_name(status.state), attempts=status.attempts,
        result=(decode_result(status.codec, status.result)
                if status.state == task_queue_pb2.TASK_STATE_SUCCEEDED else None),
        error=status.error, worker=status.worker, created_at=_seconds(status.created_at),
        started_at=_seconds(status.started_at), finished_at=_seconds(status.finished_at),
        updated_at=_seconds(status.updated_at), timeout_s=status.timeout_s,
        memory_limit_mb=status.memory_limit_mb, max_retries=status.max_retries,
        next_attempt_at=_seconds(status.next_attempt_at))


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    task_id: str
    type: str
    queue: str
    state: str
    attempts: int
    reason: str
    error: str
    dead_at: float | None


class Client:
    """A connection to one qm-server; close it (or use `with`)."""

    def __init__(self, server: str = "127.0.0.1:50051", call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 submit_retry_s: float = DEFAULT_SUBMIT_RETRY_S):
        self.server = server
        self.call_timeout_s = call_timeout_s
        self.submit_retry_s = submit_retry_s
        self._channel = grpc.insecure_channel(server)
        self._stub = task_queue_pb2_grpc.TaskQueueStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.call_timeout_s, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details() or "", self.server,
                              retry_pushback_s(exc.trailing_metadata())) from None

    def submit(self, type: str, payload: Any, *, queue: str = "", timeout_s: float = 0.0,
               memory_limit_mb: int = 0, max_retries: int | None = None, retry_backoff_s: float | None = None,
               retry_backoff_max_s: float | None = None, retry_jitter: bool | None = None,
               retry_on_timeout: bool | None = None, idempotency_key: str | None = None,
               soft_timeout_s: float = 0.0) -> str:
        """Submit a task; returns its id once the server has made it durable.

        Limits and retry options left at 0/None take the task type's, else the server's
        defaults. Every submit carries an idempotency key (a fresh one unless given), so
        while the server or its broker is UNAVAILABLE, the server is overloaded
        (RESOURCE_EXHAUSTED: after its retry hint), or a call ends CANCELLED or
        DEADLINE_EXCEEDED, the client retries with the same key for up to `submit_retry_s`,
        and a retry can never enqueue the task twice.
        """
        request = task_queue_pb2.SubmitTaskRequest(
            type=type, payload=encode_payload(payload), queue=queue, timeout_s=timeout_s,
            memory_limit_mb=memory_limit_mb, idempotency_key=idempotency_key or str(uuid.uuid4()),
            soft_timeout_s=soft_timeout_s)
        for field, value in (("max_retries", max_retries), ("retry_backoff_s", retry_backoff_s),
                             ("retry_backoff_max_s", retry_backoff_max_s), ("retry_jitter", retry_jitter),
                             ("retry_on_timeout", retry_on_timeout)):
            if value is not None:
                setattr(request, field, value)
        deadline = time.monotonic() + self.submit_retry_s
        delay_s = SUBMIT_RETRY_INITIAL_DELAY_S
        while True:
            try:
                return self._call(self._stub.SubmitTask, request).task_id
            except RemoteError as exc:
                pause_s = delay_s if exc.retry_after_s is None else exc.retry_after_s
                if exc.code not in SUBMIT_RETRY_CODES or time.monotonic() + pause_s > deadline:
                    raise
            time.sleep(pause_s)
            delay_s = min(delay_s * 2, SUBMIT_RETRY_MAX_DELAY_S)

    def workers(self) -> list[dict[str, Any]]:
        """Workers the server has heard from, with state active, draining, stopped or lost."""
        response = self._call(self._stub.ListWorkers, task_queue_pb2.ListWorkersRequest())
        return [{"worker_id": w.worker_id, "host": w.host, "pid": w.pid, "procs": w.procs, "busy": w.busy,
                 "queues": list(w.queues), "types": list(w.types), "version": w.version, "state": w.state,
                 "last_seen": _seconds(w.last_seen)} for w in response.workers]

    def task_types(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The task types the server accepts (dicts of name, codec, limits, description) and
        the plugins that failed to load there."""
        response = self._call(self._stub.ListTaskTypes, task_queue_pb2.ListTaskTypesRequest())
        types = [{"name": t.name, "codec": t.codec, "description": t.description,
                  "default_timeout_s": t.default_timeout_s, "max_timeout_s": t.max_timeout_s,
                  "default_memory_limit_mb": t.default_memory_limit_mb,
                  "max_memory_limit_mb": t.max_memory_limit_mb, "default_max_retries": t.default_max_retries}
                 for t in response.types]
        return types, list(response.plugin_errors)

    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a task (RemoteError FAILED_PRECONDITION if it already ended)."""
        request = task_queue_pb2.CancelTaskRequest(task_id=task_id)
        return status_from_proto(self._call(self._stub.CancelTask, request).status)

    def dead_letters(self, limit: int = 100) -> tuple[list[DeadLetter], int]:
        """Dead-lettered tasks (oldest first, at most `limit`) and how many there are."""
        response = self._call(self._stub.ListDeadLetters, task_queue_pb2.ListDeadLettersRequest(limit=limit))
        letters = [DeadLetter(d.task_id, d.type, d.queue, state_name(d.state), d.attempts,
                              d.reason, d.error, _seconds(d.dead_at)) for d in response.dead_letters]
        return letters, response.total

    def requeue_dead_letters(self, task_ids: Iterable[str] = (), all: bool = False) -> dict[str, str]:
        """Run dead letters again as new tasks; returns dead task id → new task id."""
        request = task_queue_pb2.RequeueDeadLettersRequest(task_ids=list(task_ids), all=all)
        return dict(self._call(self._stub.RequeueDeadLetters, request).new_task_ids)

    def purge_dead_letters(self) -> int:
        return self._call(self._stub.PurgeDeadLetters, task_queue_pb2.PurgeDeadLettersRequest()).purged

    def status(self, task_id: str) -> TaskStatus:
        request = task_queue_pb2.GetTaskStatusRequest(task_id=task_id)
        return status_from_proto(self._call(self._stub.GetTaskStatus, request).status)

    def watch(self, task_ids: Iterable[str], timeout_s: float | None = None) -> Iterator[TaskStatus]:
        """Each task's current state, then every change as it happens, until all are terminal."""
        request = task_queue_pb2.StreamTaskResultsRequest(task_ids=list(task_ids))
        stream = self._stub.StreamTaskResults(iter([request]), timeout=timeout_s)
        try:
            for response in stream:
                yield status_from_proto(response.status)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"tasks {', '.join(request.task_ids)} not finished within {timeout_s} s") from None
            raise RemoteError(exc.code(), exc.details() or "", self.server) from None
        finally:
            stream.cancel()

    def result(self, task_id: str, timeout_s: float | None = None) -> Any:
        """Wait for the task; return its result, or raise TaskError (or TimeoutError)."""
        last = None
        for last in self.watch([task_id], timeout_s):  # raises TimeoutError at the deadline
            if last.terminal:
                break
        if last is None or not last.terminal:  # the server ends a stream only at a final state
            raise QMError(f"status stream for task {task_id} ended before the task did")
        if last.state != "SUCCEEDED":
            raise TaskError(task_id, last.state, last.error)
        return last.result
