import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_FIELD: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_TASK_TYPE: _ClassVar[ErrorReason]
    ERROR_REASON_TASK_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_TASK_ALREADY_FINISHED: _ClassVar[ErrorReason]
    ERROR_REASON_IDEMPOTENCY_KEY_REUSED: _ClassVar[ErrorReason]
    ERROR_REASON_BROKER_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_BROKER_REFUSED: _ClassVar[ErrorReason]
    ERROR_REASON_CONFIG_CONFLICT: _ClassVar[ErrorReason]
    ERROR_REASON_SERVER_ERROR: _ClassVar[ErrorReason]
    ERROR_REASON_OVERLOADED: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_PERMISSION_DENIED: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMITED: _ClassVar[ErrorReason]
    ERROR_REASON_QUEUE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_VALIDATORS_BUSY: _ClassVar[ErrorReason]
    ERROR_REASON_STREAM_EXPIRED: _ClassVar[ErrorReason]
    ERROR_REASON_STORE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_NO_WORKER_FITS: _ClassVar[ErrorReason]
    ERROR_REASON_GROUP_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_SCHEDULE_NOT_FOUND: _ClassVar[ErrorReason]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_RETRYING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_TIMED_OUT: _ClassVar[TaskState]
    TASK_STATE_MEMORY_EXCEEDED: _ClassVar[TaskState]
    TASK_STATE_CRASHED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_SCHEDULED: _ClassVar[TaskState]

class ScheduleMissedTicks(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULE_MISSED_TICKS_UNSPECIFIED: _ClassVar[ScheduleMissedTicks]
    SCHEDULE_MISSED_TICKS_COALESCE: _ClassVar[ScheduleMissedTicks]
    SCHEDULE_MISSED_TICKS_SKIP: _ClassVar[ScheduleMissedTicks]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_FIELD: ErrorReason
ERROR_REASON_UNKNOWN_TASK_TYPE: ErrorReason
ERROR_REASON_TASK_NOT_FOUND: ErrorReason
ERROR_REASON_TASK_ALREADY_FINISHED: ErrorReason
ERROR_REASON_IDEMPOTENCY_KEY_REUSED: ErrorReason
ERROR_REASON_BROKER_UNAVAILABLE: ErrorReason
ERROR_REASON_BROKER_REFUSED: ErrorReason
ERROR_REASON_CONFIG_CONFLICT: ErrorReason
ERROR_REASON_SERVER_ERROR: ErrorReason
ERROR_REASON_OVERLOADED: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_PERMISSION_DENIED: ErrorReason
ERROR_REASON_RATE_LIMITED: ErrorReason
ERROR_REASON_QUEUE_FULL: ErrorReason
ERROR_REASON_VALIDATORS_BUSY: ErrorReason
ERROR_REASON_STREAM_EXPIRED: ErrorReason
ERROR_REASON_STORE_UNAVAILABLE: ErrorReason
ERROR_REASON_NO_WORKER_FITS: ErrorReason
ERROR_REASON_GROUP_NOT_FOUND: ErrorReason
ERROR_REASON_SCHEDULE_NOT_FOUND: ErrorReason
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_RETRYING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_TIMED_OUT: TaskState
TASK_STATE_MEMORY_EXCEEDED: TaskState
TASK_STATE_CRASHED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_SCHEDULED: TaskState
SCHEDULE_MISSED_TICKS_UNSPECIFIED: ScheduleMissedTicks
SCHEDULE_MISSED_TICKS_COALESCE: ScheduleMissedTicks
SCHEDULE_MISSED_TICKS_SKIP: ScheduleMissedTicks

class SubmitTaskRequest(_message.Message):
    __slots__ = ("type", "payload", "queue", "timeout_s", "memory_limit_mb", "max_retries", "retry_backoff_s", "retry_backoff_max_s", "retry_jitter", "retry_on_timeout", "idempotency_key", "soft_timeout_s", "delay_s", "not_before", "priority", "cpus")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_BACKOFF_S_FIELD_NUMBER: _ClassVar[int]
    RETRY_BACKOFF_MAX_S_FIELD_NUMBER: _ClassVar[int]
    RETRY_JITTER_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SOFT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    type: str
    payload: bytes
    queue: str
    timeout_s: float
    memory_limit_mb: int
    max_retries: int
    retry_backoff_s: float
    retry_backoff_max_s: float
    retry_jitter: bool
    retry_on_timeout: bool
    idempotency_key: str
    soft_timeout_s: float
    delay_s: float
    not_before: _timestamp_pb2.Timestamp
    priority: int
    cpus: int
    def __init__(self, type: _Optional[str] = ..., payload: _Optional[bytes] = ..., queue: _Optional[str] = ..., timeout_s: _Optional[float] = ..., memory_limit_mb: _Optional[int] = ..., max_retries: _Optional[int] = ..., retry_backoff_s: _Optional[float] = ..., retry_backoff_max_s: _Optional[float] = ..., retry_jitter: _Optional[bool] = ..., retry_on_timeout: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., soft_timeout_s: _Optional[float] = ..., delay_s: _Optional[float] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ..., cpus: _Optional[int] = ...) -> None: ...

class SubmitTaskResponse(_message.Message):
    __slots__ = ("task_id", "state")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class SubmitTasksRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SubmitTaskRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[SubmitTaskRequest, _Mapping]]] = ...) -> None: ...

class SubmitTasksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitTasksResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitTasksResult, _Mapping]]] = ...) -> None: ...

class SubmitTasksResult(_message.Message):
    __slots__ = ("task_id", "state", "code", "message", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    code: int
    message: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetTaskStatusRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class GetTaskStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    def __init__(self, status: _Optional[_Union[TaskStatus, _Mapping]] = ...) -> None: ...

class StreamTaskResultsRequest(_message.Message):
    __slots__ = ("task_ids", "final_only", "batched")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    final_only: bool
    batched: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., final_only: _Optional[bool] = ..., batched: _Optional[bool] = ...) -> None: ...

class StreamTaskResultsResponse(_message.Message):
    __slots__ = ("status", "statuses")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    statuses: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    def __init__(self, status: _Optional[_Union[TaskStatus, _Mapping]] = ..., statuses: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    def __init__(self, status: _Optional[_Union[TaskStatus, _Mapping]] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "type", "queue", "state", "attempts", "result", "codec", "error", "worker", "created_at", "started_at", "finished_at", "updated_at", "timeout_s", "memory_limit_mb", "max_retries", "next_attempt_at", "progress", "progress_message", "progress_detail_json", "progress_at", "priority", "cpus", "group_id", "schedule_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_AT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    type: str
    queue: str
    state: TaskState
    attempts: int
    result: bytes
    codec: str
    error: str
    worker: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    timeout_s: float
    memory_limit_mb: int
    max_retries: int
    next_attempt_at: _timestamp_pb2.Timestamp
    progress: float
    progress_message: str
    progress_detail_json: str
    progress_at: _timestamp_pb2.Timestamp
    priority: int
    cpus: int
    group_id: str
    schedule_id: str
    def __init__(self, task_id: _Optional[str] = ..., type: _Optional[str] = ..., queue: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempts: _Optional[int] = ..., result: _Optional[bytes] = ..., codec: _Optional[str] = ..., error: _Optional[str] = ..., worker: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., timeout_s: _Optional[float] = ..., memory_limit_mb: _Optional[int] = ..., max_retries: _Optional[int] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress: _Optional[float] = ..., progress_message: _Optional[str] = ..., progress_detail_json: _Optional[str] = ..., progress_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ..., cpus: _Optional[int] = ..., group_id: _Optional[str] = ..., schedule_id: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "host", "pid", "procs", "busy", "queues", "types", "version", "state", "last_seen", "busy_cpus")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PROCS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    BUSY_CPUS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    pid: int
    procs: int
    busy: int
    queues: _containers.RepeatedScalarFieldContainer[str]
    types: _containers.RepeatedScalarFieldContainer[str]
    version: str
    state: str
    last_seen: _timestamp_pb2.Timestamp
    busy_cpus: int
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., procs: _Optional[int] = ..., busy: _Optional[int] = ..., queues: _Optional[_Iterable[str]] = ..., types: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., busy_cpus: _Optional[int] = ...) -> None: ...

class ListTaskTypesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTaskTypesResponse(_message.Message):
    __slots__ = ("types", "plugin_errors")
    TYPES_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_ERRORS_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedCompositeFieldContainer[TaskTypeInfo]
    plugin_errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, types: _Optional[_Iterable[_Union[TaskTypeInfo, _Mapping]]] = ..., plugin_errors: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskTypeInfo(_message.Message):
    __slots__ = ("name", "codec", "description", "default_timeout_s", "max_timeout_s", "default_memory_limit_mb", "max_memory_limit_mb", "default_max_retries", "default_priority", "cpus")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MEMORY_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    codec: str
    description: str
    default_timeout_s: float
    max_timeout_s: float
    default_memory_limit_mb: int
    max_memory_limit_mb: int
    default_max_retries: int
    default_priority: int
    cpus: int
    def __init__(self, name: _Optional[str] = ..., codec: _Optional[str] = ..., description: _Optional[str] = ..., default_timeout_s: _Optional[float] = ..., max_timeout_s: _Optional[float] = ..., default_memory_limit_mb: _Optional[int] = ..., max_memory_limit_mb: _Optional[int] = ..., default_max_retries: _Optional[int] = ..., default_priority: _Optional[int] = ..., cpus: _Optional[int] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "total")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    total: int
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("task_id", "type", "queue", "state", "attempts", "reason", "error", "dead_at")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEAD_AT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    type: str
    queue: str
    state: TaskState
    attempts: int
    reason: str
    error: str
    dead_at: _timestamp_pb2.Timestamp
    def __init__(self, task_id: _Optional[str] = ..., type: _Optional[str] = ..., queue: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempts: _Optional[int] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., dead_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RequeueDeadLettersRequest(_message.Message):
    __slots__ = ("task_ids", "all")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ...) -> None: ...

class RequeueDeadLettersResponse(_message.Message):
    __slots__ = ("new_task_ids",)
    class NewTaskIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NEW_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    new_task_ids: _containers.ScalarMap[str, str]
    def __init__(self, new_task_ids: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PurgeDeadLettersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PurgeDeadLettersResponse(_message.Message):
    __slots__ = ("purged",)
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

class AddScheduleRequest(_message.Message):
    __slots__ = ("schedule_id", "cron", "every_s", "timezone", "missed_ticks", "task")
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    CRON_FIELD_NUMBER: _ClassVar[int]
    EVERY_S_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    MISSED_TICKS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    cron: str
    every_s: float
    timezone: str
    missed_ticks: ScheduleMissedTicks
    task: SubmitTaskRequest
    def __init__(self, schedule_id: _Optional[str] = ..., cron: _Optional[str] = ..., every_s: _Optional[float] = ..., timezone: _Optional[str] = ..., missed_ticks: _Optional[_Union[ScheduleMissedTicks, str]] = ..., task: _Optional[_Union[SubmitTaskRequest, _Mapping]] = ...) -> None: ...

class AddScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: Schedule
    def __init__(self, schedule: _Optional[_Union[Schedule, _Mapping]] = ...) -> None: ...

class ListSchedulesRequest(_message.Message):
    __slots__ = ("limit", "page_token")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_token: str
    def __init__(self, limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSchedulesResponse(_message.Message):
    __slots__ = ("schedules", "next_page_token")
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[Schedule]
    next_page_token: str
    def __init__(self, schedules: _Optional[_Iterable[_Union[Schedule, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RemoveScheduleRequest(_message.Message):
    __slots__ = ("schedule_id",)
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    def __init__(self, schedule_id: _Optional[str] = ...) -> None: ...

class RemoveScheduleResponse(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: Schedule
    def __init__(self, schedule: _Optional[_Union[Schedule, _Mapping]] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("schedule_id", "cron", "every_s", "timezone", "missed_ticks", "task", "created_at", "next_fire_at", "last_fired_at", "last_task_id", "fires", "missed", "last_error")
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    CRON_FIELD_NUMBER: _ClassVar[int]
    EVERY_S_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    MISSED_TICKS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIRE_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_FIRED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FIRES_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    schedule_id: str
    cron: str
    every_s: float
    timezone: str
    missed_ticks: ScheduleMissedTicks
    task: SubmitTaskRequest
    created_at: _timestamp_pb2.Timestamp
    next_fire_at: _timestamp_pb2.Timestamp
    last_fired_at: _timestamp_pb2.Timestamp
    last_task_id: str
    fires: int
    missed: int
    last_error: str
    def __init__(self, schedule_id: _Optional[str] = ..., cron: _Optional[str] = ..., every_s: _Optional[float] = ..., timezone: _Optional[str] = ..., missed_ticks: _Optional[_Union[ScheduleMissedTicks, str]] = ..., task: _Optional[_Union[SubmitTaskRequest, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_fire_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_fired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_task_id: _Optional[str] = ..., fires: _Optional[int] = ..., missed: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class SubmitGroupRequest(_message.Message):
    __slots__ = ("items", "then", "idempotency_key")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    THEN_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SubmitTaskRequest]
    then: SubmitTaskRequest
    idempotency_key: str
    def __init__(self, items: _Optional[_Iterable[_Union[SubmitTaskRequest, _Mapping]]] = ..., then: _Optional[_Union[SubmitTaskRequest, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitGroupResponse(_message.Message):
    __slots__ = ("group_id", "task_ids", "callback_task_id")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    callback_task_id: str
    def __init__(self, group_id: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ..., callback_task_id: _Optional[str] = ...) -> None: ...

class GetGroupStatusRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class GetGroupStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: GroupStatus
    def __init__(self, status: _Optional[_Union[GroupStatus, _Mapping]] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("group_id", "members", "finished", "counts", "callback_task_id", "callback_state", "created_at", "completed_at", "task_ids")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    members: int
    finished: int
    counts: _containers.RepeatedCompositeFieldContainer[GroupStateCount]
    callback_task_id: str
    callback_state: TaskState
    created_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_id: _Optional[str] = ..., members: _Optional[int] = ..., finished: _Optional[int] = ..., counts: _Optional[_Iterable[_Union[GroupStateCount, _Mapping]]] = ..., callback_task_id: _Optional[str] = ..., callback_state: _Optional[_Union[TaskState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GroupStateCount(_message.Message):
    __slots__ = ("state", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    count: int
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ..., count: _Optional[int] = ...) -> None: ...
