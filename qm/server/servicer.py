"""gRPC servicer for qm.v1.TaskQueue: proto ↔ domain only; logic lives in TaskService.

Domain errors become gRPC statuses in one place, `_STATUS_OF`: a status code and a reason
code, sent as a google.rpc.ErrorInfo in the status details (grpcio-status packs it), so
clients decide by reason, not by message text (qm/reasons.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from qm import priority as priorities
from qm import schedules
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.errors import (
    BrokerRefused,
    BrokerUnavailable,
    ConfigError,
    GroupNotFound,
    IdempotencyKeyReused,
    NoWorkerFits,
    Overloaded,
    PermissionDenied,
    QMError,
    QueueFull,
    RateLimited,
    ScheduleNotFound,
    StoreUnavailable,
    StreamExpired,
    TaskAlreadyFinished,
    TaskNotFound,
    Unauthenticated,
    UnknownTaskType,
    ValidationError,
    ValidatorsBusy,
)
from qm.reasons import DOMAIN, Reason
from qm.server.result_stream import RESPONSE_BYTES, StreamOptions, record_to_proto, responses, set_times
from qm.server.scheduler import submission_of
from qm.server.service import TaskService
from qm.server.store_api import ScheduleRecord
from qm.server.submission import Submission

log = logging.getLogger(__name__)

_STATUS_OF: dict[type[QMError], tuple[grpc.StatusCode, Reason]] = {
    ValidationError: (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD),
    UnknownTaskType: (grpc.StatusCode.INVALID_ARGUMENT, Reason.UNKNOWN_TASK_TYPE),
    TaskNotFound: (grpc.StatusCode.NOT_FOUND, Reason.TASK_NOT_FOUND),
    GroupNotFound: (grpc.StatusCode.NOT_FOUND, Reason.GROUP_NOT_FOUND),
    BrokerUnavailable: (grpc.StatusCode.UNAVAILABLE, Reason.BROKER_UNAVAILABLE),
    StoreUnavailable: (grpc.StatusCode.UNAVAILABLE, Reason.STORE_UNAVAILABLE),  # PostgreSQL down or restarting
    TaskAlreadyFinished: (grpc.StatusCode.FAILED_PRECONDITION, Reason.TASK_ALREADY_FINISHED),
    ConfigError: (grpc.StatusCode.FAILED_PRECONDITION, Reason.CONFIG_CONFLICT),  # e.g. a work queue of another type
    BrokerRefused: (grpc.StatusCode.FAILED_PRECONDITION, Reason.BROKER_REFUSED),
    IdempotencyKeyReused: (grpc.StatusCode.FAILED_PRECONDITION, Reason.IDEMPOTENCY_KEY_REUSED),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OVERLOADED),  # refused by qm/server/admission.py
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED),  # refused by qm/server/auth.py
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED),
    RateLimited: (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),  # refused by qm/server/quotas.py
    QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL),  # the work queue is at broker.max_queue_length
    ValidatorsBusy: (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.VALIDATORS_BUSY),  # every validator thread a runaway's
    StreamExpired: (grpc.StatusCode.UNAVAILABLE, Reason.STREAM_EXPIRED),  # open for server.max_stream_s
    ScheduleNotFound: (grpc.StatusCode.NOT_FOUND, Reason.SCHEDULE_NOT_FOUND),
    NoWorkerFits: (grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_WORKER_FITS),  # cpus over every live worker's procs
}
#: Any other domain error.
_OTHER = (grpc.StatusCode.INTERNAL, Reason.SERVER_ERROR)
#: Attributes of a domain error that ErrorInfo.metadata carries: what the error is about.
_METADATA_ATTRIBUTES = ("field", "task_id", "schedule_id", "group_id", "max_stream_ids")


def error_status(error: QMError) -> tuple[grpc.StatusCode, Reason]:
    """The status code and reason code of a domain error (its closest mapped class)."""
    for error_class in type(error).__mro__:
        if error_class in _STATUS_OF:
            return _STATUS_OF[error_class]
    return _OTHER


def status_code_for(error: QMError) -> grpc.StatusCode:
    return error_status(error)[0]


def rich_status(error: QMError) -> grpc.Status:
    """The gRPC status of a domain error, its ErrorInfo packed in the details trailer."""
    code, reason = error_status(error)
    metadata = {name: str(getattr(error, name)) for name in _METADATA_ATTRIBUTES if getattr(error, name, None)}
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(error), details=[detail]))


async def abort_with(context, error: QMError) -> None:
    """End the call with the error's status (raises, as context.abort does)."""
    status = rich_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _maps_errors(method):
    """Turn a domain error raised by a unary handler into its gRPC status; time the call."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except QMError as exc:
            code = status_code_for(exc)
            await abort_with(context, exc)
        finally:
            self.service.metrics.rpc_seconds.labels(method.__name__, code.name).observe(time.perf_counter() - started)

    return wrapper


#: SubmitTaskRequest's optional retry fields → RetryPolicy field names (TaskService.submit's options).
_RETRY_FIELDS = {
    "max_retries": "max_retries",
    "retry_backoff_s": "backoff_s",
    "retry_backoff_max_s": "backoff_max_s",
    "retry_jitter": "jitter",
    "retry_on_timeout": "on_timeout",
}


def submission_from_proto(request: task_queue_pb2.SubmitTaskRequest) -> Submission:
    retry_options = {
        option: getattr(request, field) if request.HasField(field) else None for field, option in _RETRY_FIELDS.items()
    }
    return Submission(
        request.type,
        request.payload,
        request.queue,
        request.timeout_s,
        request.memory_limit_mb,
        request.idempotency_key,
        request.soft_timeout_s,
        retry_options,
        request.delay_s if request.HasField("delay_s") else None,
        request.not_before.ToNanoseconds() / 1e9 if request.HasField("not_before") else None,
        request.priority if request.HasField("priority") else None,
        request.cpus,
    )


#: ScheduleMissedTicks ↔ qm.schedules policy names.
_MISSED_OF = {
    task_queue_pb2.SCHEDULE_MISSED_TICKS_UNSPECIFIED: schedules.COALESCE,
    task_queue_pb2.SCHEDULE_MISSED_TICKS_COALESCE: schedules.COALESCE,
    task_queue_pb2.SCHEDULE_MISSED_TICKS_SKIP: schedules.SKIP,
}
_MISSED_TO = {
    schedules.COALESCE: task_queue_pb2.SCHEDULE_MISSED_TICKS_COALESCE,
    schedules.SKIP: task_queue_pb2.SCHEDULE_MISSED_TICKS_SKIP,
}


def schedule_to_proto(schedule: ScheduleRecord) -> task_queue_pb2.Schedule:
    task = submission_of(schedule)
    request = task_queue_pb2.SubmitTaskRequest(
        type=task.type,
        payload=task.payload,
        queue=task.queue,
        timeout_s=task.timeout_s,
        memory_limit_mb=task.memory_limit_mb,
        soft_timeout_s=task.soft_timeout_s,
    )
    for field, option in _RETRY_FIELDS.items():
        if task.retry_options.get(option) is not None:
            setattr(request, field, task.retry_options[option])
    proto = task_queue_pb2.Schedule(
        schedule_id=schedule.schedule_id,
        cron=schedule.cron,
        every_s=schedule.every_s,
        timezone=schedule.timezone,
        missed_ticks=_MISSED_TO[schedule.missed],
        task=request,
        last_task_id=schedule.last_task_id,
        fires=schedule.fires,
        missed=schedule.missed_ticks,
        last_error=schedule.last_error,
    )
    set_times(
        proto, created_at=schedule.created_at, next_fire_at=schedule.next_fire_at, last_fired_at=schedule.last_tick_at
    )
    return proto


class TaskQueueServicer(task_queue_pb2_grpc.TaskQueueServicer):
    def __init__(self, service: TaskService, stream_response_bytes: int = RESPONSE_BYTES) -> None:
        self.service = service
        self.stream_response_bytes = stream_response_bytes  # a batched stream's response, at most

    @_maps_errors
    async def SubmitTask(self, request, context):
        record = await self.service.submit_item(submission_from_proto(request))
        return task_queue_pb2.SubmitTaskResponse(task_id=record.task_id, state=int(record.state))  # type: ignore[arg-type]  # protoc .pyi: enum fields typed as the enum class; they take ints

    @_maps_errors
    async def SubmitTasks(self, request, context):
        outcomes = await self.service.submit_many([submission_from_proto(item) for item in request.items])
        response = task_queue_pb2.SubmitTasksResponse()
        for outcome in outcomes:
            if isinstance(outcome, QMError):
                code, reason = error_status(outcome)
                response.results.add(code=code.value[0], message=str(outcome), reason=reason)
            else:
                response.results.add(task_id=outcome.task_id, state=int(outcome.state))
        return response

    @_maps_errors
    async def SubmitGroup(self, request, context):
        then = submission_from_proto(request.then) if request.HasField("then") else None
        group, task_ids = await self.service.groups.submit(
            [submission_from_proto(item) for item in request.items], then, request.idempotency_key
        )
        return task_queue_pb2.SubmitGroupResponse(
            group_id=group.group_id, task_ids=task_ids, callback_task_id=group.callback_task_id
        )

    @_maps_errors
    async def GetGroupStatus(self, request, context):
        state = await self.service.groups.status(request.group_id)
        group = state.group
        status = task_queue_pb2.GroupStatus(
            group_id=group.group_id,
            members=group.members,
            finished=sum(count for member_state, count in state.counts.items() if member_state.terminal),
            callback_task_id=group.callback_task_id,
            callback_state=int(state.callback_state or 0),  # type: ignore[arg-type]  # protoc .pyi: enums take ints
            task_ids=[task_id for task_id, _state in state.members],
        )
        for member_state, count in sorted(state.counts.items()):
            status.counts.add(state=int(member_state), count=count)
        set_times(status, created_at=group.created_at, completed_at=group.completed_at)
        return task_queue_pb2.GetGroupStatusResponse(status=status)

    @_maps_errors
    async def ListWorkers(self, request, context):
        response = task_queue_pb2.ListWorkersResponse()
        for beat, seen_at, state in self.service.workers.list():
            info = response.workers.add(
                worker_id=beat.worker_id,
                host=beat.host,
                pid=beat.pid,
                procs=beat.procs,
                busy=beat.busy,
                queues=beat.queues,
                types=beat.types,
                version=beat.version,
                state=state,
                busy_cpus=beat.busy_cpus,
            )
            info.last_seen.FromNanoseconds(int(seen_at * 1e9))
        return response

    @_maps_errors
    async def ListTaskTypes(self, request, context):
        service = self.service
        response = task_queue_pb2.ListTaskTypesResponse(plugin_errors=[str(error) for error in service.registry.errors])
        for name, declared in sorted(service.registry.types.items()):
            policy = declared.retry or service.default_retry
            response.types.add(
                name=name,
                codec=declared.codec,
                description=declared.description,
                default_timeout_s=declared.default_timeout_s or service.default_timeout_s,
                max_timeout_s=declared.max_timeout_s or 0,
                default_memory_limit_mb=declared.default_memory_limit_mb or service.default_memory_limit_mb,
                max_memory_limit_mb=declared.max_memory_limit_mb or 0,
                default_max_retries=policy.max_retries,
                default_priority=priorities.DEFAULT_PRIORITY if declared.priority is None else declared.priority,
                cpus=declared.cpus,
            )
        return response

    @_maps_errors
    async def CancelTask(self, request, context):
        record = await self.service.cancel(request.task_id)
        return task_queue_pb2.CancelTaskResponse(status=record_to_proto(record))

    @_maps_errors
    async def ListDeadLetters(self, request, context):
        letters, total = await self.service.dead_letters.list(request.limit)
        response = task_queue_pb2.ListDeadLettersResponse(total=total)
        for letter in letters:
            item = response.dead_letters.add(
                task_id=letter.task_id,
                type=letter.type,
                queue=letter.queue,
                state=int(letter.state),
                attempts=letter.attempts,
                reason=letter.reason,
                error=letter.error,
            )
            item.dead_at.FromNanoseconds(int(letter.dead_at * 1e9))
        return response

    @_maps_errors
    async def RequeueDeadLetters(self, request, context):
        if not request.all and not request.task_ids:
            raise ValidationError("task_ids", "name the dead letters to requeue, or set all")
        renamed = await self.service.dead_letters.requeue(None if request.all else list(request.task_ids))
        return task_queue_pb2.RequeueDeadLettersResponse(new_task_ids=renamed)

    @_maps_errors
    async def PurgeDeadLetters(self, request, context):
        return task_queue_pb2.PurgeDeadLettersResponse(purged=await self.service.dead_letters.purge())

    @_maps_errors
    async def AddSchedule(self, request, context):
        if request.missed_ticks not in _MISSED_OF:
            raise ValidationError("missed_ticks", f"unknown value {request.missed_ticks}")
        schedule_id = request.schedule_id or f"sch-{uuid.uuid4().hex[:12]}"
        stored = await self.service.scheduler.add(
            schedule_id,
            schedules.When(request.cron, request.every_s, request.timezone),
            _MISSED_OF[request.missed_ticks],
            submission_from_proto(request.task),
        )
        return task_queue_pb2.AddScheduleResponse(schedule=schedule_to_proto(stored))

    @_maps_errors
    async def ListSchedules(self, request, context):
        page, next_token = await self.service.scheduler.list(request.page_token, request.limit)
        return task_queue_pb2.ListSchedulesResponse(
            schedules=[schedule_to_proto(schedule) for schedule in page], next_page_token=next_token
        )

    @_maps_errors
    async def RemoveSchedule(self, request, context):
        removed = await self.service.scheduler.remove(request.schedule_id)
        return task_queue_pb2.RemoveScheduleResponse(schedule=schedule_to_proto(removed))

    @_maps_errors
    async def GetTaskStatus(self, request, context):
        record = await self.service.status(request.task_id)
        return task_queue_pb2.GetTaskStatusResponse(status=record_to_proto(record))

    async def StreamTaskResults(self, request_iterator, context):
        """Current state of each followed task first, then each change, until terminal."""
        updates: asyncio.Queue = asyncio.Queue()
        followed: set[str] = set()
        options = StreamOptions(response_bytes=self.stream_response_bytes)
        reader = asyncio.create_task(self._read_follow_requests(request_iterator, updates, followed, options))
        self.service.metrics.open_streams.inc()
        try:
            async for response in responses(updates, followed, options):
                yield response
        except QMError as exc:
            await abort_with(context, exc)
        finally:
            self.service.metrics.open_streams.dec()
            reader.cancel()
            for task_id in followed:
                self.service.hub.unfollow(task_id, updates)

    async def _read_follow_requests(
        self, request_iterator, updates: asyncio.Queue, followed: set[str], options: StreamOptions
    ):
        try:
            async for request in request_iterator:
                if not options.read:  # the first request sets the stream's options
                    options.final_only, options.batched, options.read = request.final_only, request.batched, True
                new = [task_id for task_id in dict.fromkeys(request.task_ids) if task_id not in followed]
                for task_id in new:
                    self.service.hub.follow(task_id, updates)  # follow first: no change is missed
                    followed.add(task_id)
                found = await self.service.records(new)  # one look-up for the lot, not one each
                for task_id in new:
                    if task_id not in found:
                        raise TaskNotFound(task_id)
                    updates.put_nowait(found[task_id])
        except QMError as exc:
            updates.put_nowait(exc)  # the stream loop raises it as the stream's status
        finally:
            updates.put_nowait(None)  # the client half-closed
