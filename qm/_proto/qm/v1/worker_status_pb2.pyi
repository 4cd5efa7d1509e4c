import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetWorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWorkerStatusResponse(_message.Message):
    __slots__ = ("worker_id", "draining", "procs", "prefetch", "queues", "children", "tasks_finished", "child_restarts")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PROCS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    TASKS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CHILD_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    draining: bool
    procs: int
    prefetch: int
    queues: _containers.RepeatedScalarFieldContainer[str]
    children: _containers.RepeatedCompositeFieldContainer[ChildStatus]
    tasks_finished: int
    child_restarts: int
    def __init__(self, worker_id: _Optional[str] = ..., draining: _Optional[bool] = ..., procs: _Optional[int] = ..., prefetch: _Optional[int] = ..., queues: _Optional[_Iterable[str]] = ..., children: _Optional[_Iterable[_Union[ChildStatus, _Mapping]]] = ..., tasks_finished: _Optional[int] = ..., child_restarts: _Optional[int] = ...) -> None: ...

class ChildStatus(_message.Message):
    __slots__ = ("slot", "pid", "task_id", "type", "running_since", "rss_bytes", "tasks_done")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SINCE_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    slot: int
    pid: int
    task_id: str
    type: str
    running_since: _timestamp_pb2.Timestamp
    rss_bytes: int
    tasks_done: int
    def __init__(self, slot: _Optional[int] = ..., pid: _Optional[int] = ..., task_id: _Optional[str] = ..., type: _Optional[str] = ..., running_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rss_bytes: _Optional[int] = ..., tasks_done: _Optional[int] = ...) -> None: ...
