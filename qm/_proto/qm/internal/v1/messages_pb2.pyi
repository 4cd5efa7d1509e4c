import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from qm._proto.qm.v1 import task_queue_pb2 as _task_queue_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskMessage(_message.Message):
    __slots__ = ("task_id", "type", "payload", "queue", "attempt", "enqueued_at", "timeout_s", "memory_limit_mb", "retry", "soft_timeout_s", "not_before", "priority", "cpus")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    SOFT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    type: str
    payload: bytes
    queue: str
    attempt: int
    enqueued_at: _timestamp_pb2.Timestamp
    timeout_s: float
    memory_limit_mb: int
    retry: RetryPolicy
    soft_timeout_s: float
    not_before: _timestamp_pb2.Timestamp
    priority: int
    cpus: int
    def __init__(self, task_id: _Optional[str] = ..., type: _Optional[str] = ..., payload: _Optional[bytes] = ..., queue: _Optional[str] = ..., attempt: _Optional[int] = ..., enqueued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., timeout_s: _Optional[float] = ..., memory_limit_mb: _Optional[int] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ..., soft_timeout_s: _Optional[float] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ..., cpus: _Optional[int] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_retries", "backoff_s", "backoff_max_s", "jitter", "on_timeout")
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_S_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MAX_S_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    ON_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    max_retries: int
    backoff_s: float
    backoff_max_s: float
    jitter: bool
    on_timeout: bool
    def __init__(self, max_retries: _Optional[int] = ..., backoff_s: _Optional[float] = ..., backoff_max_s: _Optional[float] = ..., jitter: _Optional[bool] = ..., on_timeout: _Optional[bool] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("task_id", "type", "queue", "attempt", "state", "result", "error", "worker", "at", "timeout_s", "memory_limit_mb", "next_attempt_at", "max_retries", "progress", "started_at", "packed", "run_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    RUN_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    type: str
    queue: str
    attempt: int
    state: _task_queue_pb2.TaskState
    result: bytes
    error: str
    worker: str
    at: _timestamp_pb2.Timestamp
    timeout_s: float
    memory_limit_mb: int
    next_attempt_at: _timestamp_pb2.Timestamp
    max_retries: int
    progress: TaskProgress
    started_at: _timestamp_pb2.Timestamp
    packed: _containers.RepeatedCompositeFieldContainer[TaskEvent]
    run_s: float
    def __init__(self, task_id: _Optional[str] = ..., type: _Optional[str] = ..., queue: _Optional[str] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[_task_queue_pb2.TaskState, str]] = ..., result: _Optional[bytes] = ..., error: _Optional[str] = ..., worker: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., timeout_s: _Optional[float] = ..., memory_limit_mb: _Optional[int] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_retries: _Optional[int] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., packed: _Optional[_Iterable[_Union[TaskEvent, _Mapping]]] = ..., run_s: _Optional[float] = ...) -> None: ...

class TaskProgress(_message.Message):
    __slots__ = ("fraction", "message", "detail_json")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    message: str
    detail_json: str
    def __init__(self, fraction: _Optional[float] = ..., message: _Optional[str] = ..., detail_json: _Optional[str] = ...) -> None: ...

class WorkerHeartbeat(_message.Message):
    __slots__ = ("worker_id", "host", "pid", "procs", "busy", "queues", "types", "version", "draining", "stopped", "at", "busy_cpus", "features")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PROCS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    BUSY_CPUS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    pid: int
    procs: int
    busy: int
    queues: _containers.RepeatedScalarFieldContainer[str]
    types: _containers.RepeatedScalarFieldContainer[str]
    version: str
    draining: bool
    stopped: bool
    at: _timestamp_pb2.Timestamp
    busy_cpus: int
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., procs: _Optional[int] = ..., busy: _Optional[int] = ..., queues: _Optional[_Iterable[str]] = ..., types: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., draining: _Optional[bool] = ..., stopped: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., busy_cpus: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskBundle(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tasks: _Optional[_Iterable[bytes]] = ...) -> None: ...
