"""What travels through RabbitMQ: task messages and task events, as protobuf bytes.

Domain code handles the dataclasses; only this module knows the wire format
(protos/qm/internal/v1/messages.proto).
"""

from __future__ import annotations

import dataclasses
import time

from google.protobuf.message import DecodeError

from qm._proto.qm.internal.v1 import messages_pb2
from qm.broker import topology
from qm.priority import DEFAULT_PRIORITY, MAX_PRIORITY
from qm.protocol import Header
from qm.retry import RetryPolicy
from qm.states import TaskState
from qm.task_progress import Progress


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """One attempt of a task, as a worker receives it."""

    task_id: str
    type: str
    payload: bytes
    queue: str
    attempt: int = 1
    enqueued_at_s: float = dataclasses.field(default_factory=time.time)
    timeout_s: float = 0.0
    memory_limit_mb: int = 0
    retry: RetryPolicy = RetryPolicy()
    soft_timeout_s: float = 0.0  # when the task gets qm.SoftTimeout; 0 = never
    not_before_s: float | None = None  # run no earlier (a delayed task; qm/scheduling.py)
    priority: int = DEFAULT_PRIORITY  # 0-9, higher first: picks its work queue band (qm/priority.py)
    cpus: int = 1  # CPU slots it takes on a worker (qm/worker/cpu_slots.py)

    @property
    def routing_key(self) -> str:
        """Where it goes on qm.tasks, the one rule for every publish of a task (submit,
        replay, reconciler, retry and delay tiers, give-back, dead-letter requeue): its
        size's work queue for cpus > 1 (no bands there), else its priority band's."""
        return topology.routing_key(self.queue, priority=self.priority, cpus=self.cpus)

    def encode(self) -> bytes:
        retry = messages_pb2.RetryPolicy(
            max_retries=self.retry.max_retries,
            backoff_s=self.retry.backoff_s,
            backoff_max_s=self.retry.backoff_max_s,
            jitter=self.retry.jitter,
            on_timeout=self.retry.on_timeout,
        )
        message = messages_pb2.TaskMessage(
            task_id=self.task_id,
            type=self.type,
            payload=self.payload,
            queue=self.queue,
            attempt=self.attempt,
            timeout_s=self.timeout_s,
            memory_limit_mb=self.memory_limit_mb,
            retry=retry,
            soft_timeout_s=self.soft_timeout_s,
            priority=self.priority,
            cpus=self.cpus if self.cpus > 1 else 0,
        )
        message.enqueued_at.FromNanoseconds(int(self.enqueued_at_s * 1e9))
        if self.not_before_s is not None:
            message.not_before.FromNanoseconds(int(self.not_before_s * 1e9))
        return message.SerializeToString()

    @classmethod
    def decode(cls, body: bytes) -> "TaskMessage":
        message = _parse(messages_pb2.TaskMessage, body)
        if not message.task_id or not message.type:
            raise ValueError("task message without task_id or type")
        retry = RetryPolicy(
            message.retry.max_retries,
            message.retry.backoff_s,
            message.retry.backoff_max_s,
            message.retry.jitter,
            message.retry.on_timeout,
        )
        return cls(
            message.task_id,
            message.type,
            message.payload,
            message.queue,
            message.attempt or 1,
            message.enqueued_at.ToNanoseconds() / 1e9,
            message.timeout_s,
            message.memory_limit_mb,
            retry,
            message.soft_timeout_s,
            message.not_before.ToNanoseconds() / 1e9 if message.HasField("not_before") else None,
            min(message.priority, MAX_PRIORITY) if message.HasField("priority") else DEFAULT_PRIORITY,
            max(1, message.cpus),
        )

    def headers(self) -> dict[str, object]:
        """AMQP headers naming the task, so operators can read a message without decoding it."""
        return {Header.TASK_ID: self.task_id, Header.TYPE: self.type, Header.ATTEMPT: self.attempt}


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    """One state change of one task attempt, published by whoever caused it."""

    task_id: str
    type: str
    queue: str
    attempt: int
    state: TaskState
    worker: str = ""
    result: bytes = b""
    error: str = ""
    at_s: float = dataclasses.field(default_factory=time.time)
    timeout_s: float = 0.0  # limits the worker applied (RUNNING); 0 = unchanged
    memory_limit_mb: int = 0
    next_attempt_at_s: float | None = None  # RETRYING: when the next attempt is due
    progress: Progress | None = None  # a progress report (state RUNNING, but no start)
    # An outcome whose run no RUNNING event announced (shorter than the worker's
    # running_event_delay_s): when it started; the store counts the start from it.
    started_at_s: float | None = None
    run_s: float = 0.0  # an outcome's run time by the child's clock; 0 = unknown

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString()

    def to_proto(self) -> messages_pb2.TaskEvent:
        """The wire message (for `pack_events`; `encode` serializes it)."""
        event = messages_pb2.TaskEvent(
            task_id=self.task_id,
            type=self.type,
            queue=self.queue,
            attempt=self.attempt,
            state=int(self.state),  # type: ignore[arg-type]  # protoc .pyi: enum fields typed as the enum class; they take ints
            result=self.result,
            error=self.error,
            worker=self.worker,
            timeout_s=self.timeout_s,
            memory_limit_mb=self.memory_limit_mb,
            run_s=self.run_s,
        )
        event.at.FromNanoseconds(int(self.at_s * 1e9))
        if self.next_attempt_at_s is not None:
            event.next_attempt_at.FromNanoseconds(int(self.next_attempt_at_s * 1e9))
        if self.started_at_s is not None:
            event.started_at.FromNanoseconds(int(self.started_at_s * 1e9))
        if self.progress is not None:
            event.progress.fraction = self.progress.fraction
            event.progress.message = self.progress.message
            event.progress.detail_json = self.progress.detail_json
        return event

    @classmethod
    def decode(cls, body: bytes) -> "TaskEvent":
        """One event; ValueError for a pack (see `decode_all`) or anything undecodable."""
        return cls._from_proto(_parse(messages_pb2.TaskEvent, body))

    @classmethod
    def decode_all(cls, body: bytes) -> list["TaskEvent"]:
        """The events of a message body: one event, or each event of a pack, in order."""
        event = _parse(messages_pb2.TaskEvent, body)
        if event.packed:
            return [cls._from_proto(packed) for packed in event.packed]
        return [cls._from_proto(event)]

    @classmethod
    def _from_proto(cls, event: messages_pb2.TaskEvent) -> "TaskEvent":
        if not event.task_id:
            raise ValueError("task event without task_id")
        return cls(
            event.task_id,
            event.type,
            event.queue,
            event.attempt,
            TaskState(event.state),  # type: ignore[arg-type]  # protoc .pyi: the enum field is typed as the proto enum, an int at run time
            event.worker,
            event.result,
            event.error,
            event.at.ToNanoseconds() / 1e9,
            event.timeout_s,
            event.memory_limit_mb,
            event.next_attempt_at.ToNanoseconds() / 1e9 if event.HasField("next_attempt_at") else None,
            Progress(event.progress.fraction, event.progress.message, event.progress.detail_json)
            if event.HasField("progress")
            else None,
            event.started_at.ToNanoseconds() / 1e9 if event.HasField("started_at") else None,
            event.run_s,
        )


def pack_events(events: list[messages_pb2.TaskEvent]) -> bytes:
    """One message body holding `events` in order (TaskEvent.packed); `TaskEvent.decode_all`
    reads it. Servers that predate packs drop it: see worker.pack_events."""
    return messages_pb2.TaskEvent(packed=events).SerializeToString()


def encode_bundle(bodies: list[bytes]) -> bytes:
    """One work-queue message body holding these TaskMessage bodies, in order (published
    with the header Header.BUNDLE: their count)."""
    return messages_pb2.TaskBundle(tasks=bodies).SerializeToString()


def decode_bundle(body: bytes) -> list[bytes]:
    """The TaskMessage bodies of a bundle; ValueError if it is no bundle or empty."""
    tasks = list(_parse(messages_pb2.TaskBundle, body).tasks)
    if not tasks:
        raise ValueError("undecodable TaskBundle: no tasks in it")
    return tasks


def decode_tasks(bodies: list[bytes]) -> tuple[list[tuple[bytes, TaskMessage]], list[ValueError]]:
    """A bundle's tasks that decode, each with its body, and why the others do not."""
    tasks, errors = [], []
    for body in bodies:
        try:
            tasks.append((body, TaskMessage.decode(body)))
        except ValueError as exc:
            errors.append(exc)
    return tasks, errors


def is_bundle(headers: dict) -> bool:
    """Whether a work-queue message is a bundle (by its headers; the body says nothing)."""
    return Header.BUNDLE in headers


def _parse(message_class, body: bytes):
    message = message_class()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise ValueError(f"undecodable {message_class.__name__}: {exc}") from exc
    return message


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """A worker announcing itself: who, where, what it serves, how busy."""

    worker_id: str
    host: str
    pid: int
    procs: int
    busy: int
    queues: tuple[str, ...]
    types: tuple[str, ...]
    version: str
    draining: bool = False
    stopped: bool = False
    at_s: float = dataclasses.field(default_factory=time.time)
    busy_cpus: int = 0  # CPU slots held by running tasks (a cpus=N task holds N)
    features: tuple[str, ...] = ()  # what it reads beyond a task a message (protocol.Feature)

    def encode(self) -> bytes:
        beat = messages_pb2.WorkerHeartbeat(
            worker_id=self.worker_id,
            host=self.host,
            pid=self.pid,
            procs=self.procs,
            busy=self.busy,
            queues=self.queues,
            types=self.types,
            version=self.version,
            draining=self.draining,
            stopped=self.stopped,
            busy_cpus=self.busy_cpus,
            features=self.features,
        )
        beat.at.FromNanoseconds(int(self.at_s * 1e9))
        return beat.SerializeToString()

    @classmethod
    def decode(cls, body: bytes) -> "Heartbeat":
        beat = _parse(messages_pb2.WorkerHeartbeat, body)
        if not beat.worker_id:
            raise ValueError("heartbeat without worker_id")
        return cls(
            beat.worker_id,
            beat.host,
            beat.pid,
            beat.procs,
            beat.busy,
            tuple(beat.queues),
            tuple(beat.types),
            beat.version,
            beat.draining,
            beat.stopped,
            beat.at.ToNanoseconds() / 1e9,
            beat.busy_cpus,
            tuple(beat.features),
        )
