"""Domain errors. Every error a user sees names what happened and what to change."""

from __future__ import annotations

import dataclasses


class QMError(Exception):
    """Base of every QueueMaster error."""


class ConfigError(QMError):
    """A configuration key has a bad value or is unknown; names the key's path."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"config {path}: {reason}")


class ValidationError(QMError):
    """Bad input to the API; names the field at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class StreamIdsOverLimit(ValidationError):
    """A results stream named more task ids than the server lets one stream follow
    (server.max_stream_ids). The limit travels in the error's metadata, so a client
    follows the rest on further streams of that size instead of failing."""

    def __init__(self, sent: int, max_stream_ids: int):
        self.max_stream_ids = max_stream_ids
        super().__init__(
            "task_ids",
            f"{sent} task ids sent on one stream, over the limit of {max_stream_ids} "
            "(server.max_stream_ids); follow more tasks on further streams",
        )


class UnknownTaskType(ValidationError):
    """The task type is not served by any installed plugin."""

    def __init__(self, task_type: str, known: list[str]):
        known_text = ", ".join(sorted(known)) or "none installed"
        super().__init__("type", f"unknown task type {task_type!r} (known: {known_text})")


class NoWorkerFits(ValidationError):
    """A task asks for more CPU slots than any live worker of its queue has (field cpus)."""

    def __init__(self, cpus: int, queue: str, largest: int):
        super().__init__(
            "cpus",
            f"the task asks for {cpus} CPUs, but the largest live worker consuming queue {queue!r} "
            f"runs {largest} (qm-worker --procs {largest}); no worker could ever run it. Submit it "
            f"with cpus <= {largest}, or start a worker with --procs {cpus} or more first",
        )
        self.cpus = cpus
        self.largest = largest


class PluginError(QMError):
    """A plugin could not be loaded or declares something invalid."""


class BrokerUnavailable(QMError):
    """The message broker cannot be reached or refused the message."""


class QueueFull(BrokerUnavailable):
    """RabbitMQ refused a message (basic.nack): its work queue is at its length cap
    (broker.max_queue_length, overflow reject-publish), or, on a cluster, a quorum queue
    has no leader for the moment. A BrokerUnavailable for code that retries publishes;
    the API answers it RESOURCE_EXHAUSTED (QUEUE_FULL): both pass with time."""


class ValidatorsBusy(QMError):
    """Every payload-validator thread is still busy after the time budget (validators
    that run long): the submission was not checked; a later retry may be."""

    def __init__(self, threads: int, timeout_s: float):
        super().__init__(
            f"all {threads} payload validator threads (server.validate_threads) are busy with "
            f"validations over their budget of {timeout_s:g} s; retry later"
        )


class PublishOutcomeUnknown(BrokerUnavailable):
    """The message was handed to the broker, but the connection was lost before its confirm:
    the broker may hold it (a quorum queue on the surviving nodes) or not."""


class BrokerRefused(QMError):
    """The broker refused a declaration or look-up (AMQP 404 NOT_FOUND, 406
    PRECONDITION_FAILED: a queue exists with other arguments); the connection stays up."""

    def __init__(self, code: int, text: str):
        super().__init__(f"RabbitMQ refused: {code} {text}")
        self.code = code
        self.text = text


class ConsumerRefused(QMError):
    """The broker refused a consumer because of exclusive use: the queue has an exclusive
    consumer, or an exclusive one was asked for while the queue had consumers."""

    def __init__(self, queue: str, detail: str = ""):
        self.queue = queue
        self.detail = detail
        why = f" ({detail})" if detail else ""
        super().__init__(f"the broker refused a consumer on queue {queue}: it is in exclusive use{why}")


class StoreUnavailable(QMError):
    """The task store (a PostgreSQL server) cannot be reached right now; retry later."""


class StoreSchemaError(QMError):
    """The task store's schema is one this QueueMaster cannot use (e.g. written by a newer one)."""


class IdempotencyKeyTaken(QMError):
    """Another server stored a task under this idempotency key first (the store's unique
    index refused the second); the submit answers with that task instead."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"idempotency key {key!r} is already taken")


class ServerIdentityError(QMError):
    """qm-server cannot establish who it is: its data directory or recorded id is unusable."""


class DuplicateServer(ServerIdentityError):
    """Another live qm-server already uses this data directory or this server id."""


class Overloaded(QMError):
    """qm-server has server.max_concurrent_rpcs calls in flight: a new call is refused at
    once (RESOURCE_EXHAUSTED), with a retry hint."""

    def __init__(self, in_flight: int, limit: int, retry_after_ms: int):
        self.retry_after_ms = retry_after_ms
        super().__init__(
            f"qm-server is overloaded: {in_flight} calls in flight, the limit "
            f"(server.max_concurrent_rpcs) is {limit}; retry in {retry_after_ms} ms"
        )


class Unauthenticated(QMError):
    """A call without credentials the server accepts (qm/server/auth.py)."""


class PermissionDenied(QMError):
    """A caller whose role lacks the right for the method (qm/server/auth.py)."""


class RateLimited(QMError):
    """The caller submitted faster than server.submit_rate_per_s allows: refused at once
    (RESOURCE_EXHAUSTED), nothing submitted, with the wait until it may."""

    def __init__(self, count: int, rate_per_s: float, burst: int, retry_after_ms: int):
        self.retry_after_ms = retry_after_ms
        super().__init__(
            f"submit rate limit reached: {count} task(s) refused, nothing submitted; this caller may "
            f"submit {rate_per_s:g} tasks/s with bursts of {burst} (server.submit_rate_per_s, "
            f"server.submit_burst); retry in {retry_after_ms} ms"
        )


class StreamExpired(QMError):
    """A StreamTaskResults stream was open for server.max_stream_s: it ends (UNAVAILABLE);
    a new one picks up the tasks still followed."""

    def __init__(self, max_stream_s: float):
        super().__init__(
            f"this stream was open for {max_stream_s:g} s, the longest a result stream may last "
            "(server.max_stream_s); open a new one for the tasks still followed"
        )


class TaskNotFound(QMError):
    """No task with that id is known to this server."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")


class ScheduleNotFound(QMError):
    """No periodic schedule with this id."""

    def __init__(self, schedule_id: str):
        self.schedule_id = schedule_id
        super().__init__(f"no schedule {schedule_id!r}; qm schedule list shows them")


class GroupNotFound(QMError):
    """No group with that id is known to this server."""

    def __init__(self, group_id: str):
        self.group_id = group_id
        super().__init__(f"no group with id {group_id!r} (never submitted here, or finished past server.retention_s)")


class TaskAlreadyFinished(QMError):
    """The task has reached a final state; it cannot be cancelled."""

    def __init__(self, task_id: str, state: str):
        self.task_id = task_id
        self.state = state
        super().__init__(f"task {task_id} already ended {state}; there is nothing to cancel")


class IdempotencyKeyReused(QMError):
    """An idempotency key came back with a different request than the one it was first used
    for (another type, payload, queue, limits or retry options)."""

    def __init__(self, key: str, task_id: str):
        self.key = key
        self.task_id = task_id
        super().__init__(
            f"idempotency key {key!r} was already used for another request (task {task_id}, with a different "
            "type, payload, queue, limits or retry options); nothing was submitted. Use a new key for a new "
            "request, or send exactly the first request again to get its task"
        )


class BatchError(QMError):
    """Some items of a batch submission were refused (qm.Client.submit_many).

    The accepted items are durable and will run: `task_ids` holds one entry per item in
    order, the task id of an accepted item and None for a refused one; `refused` lists
    each refused item (index, task type, status code name, reason).
    """

    def __init__(self, task_ids: list[str | None], refused: list[RefusedItem]):
        self.task_ids = task_ids
        self.refused = refused
        shown = "; ".join(f"item {item.index} ({item.type}): {item.code} {item.message}" for item in refused[:20])
        more = f"; and {len(refused) - 20} more" if len(refused) > 20 else ""
        accepted = len(task_ids) - len(refused)
        super().__init__(
            f"{len(refused)} of {len(task_ids)} items refused ({accepted} accepted, durable and "
            f"on this error's task_ids): {shown}{more}"
        )

    @property
    def accepted_ids(self) -> list[str]:
        """Ids of the accepted items, in the batch's order."""
        return [task_id for task_id in self.task_ids if task_id is not None]


@dataclasses.dataclass(frozen=True)
class RefusedItem:
    """One refused item of a batch: its position (0-based), task type, the gRPC status code
    name SubmitTask would have answered it with, why, and qm-server's reason code (a
    qm.reasons.Reason; None if the call failed without reaching it)."""

    index: int
    type: str
    code: str
    message: str
    reason: str | None = None


class TaskError(QMError):
    """A task ended in a state other than SUCCEEDED (raised by client.result)."""

    def __init__(self, task_id: str, state: str, error: str):
        self.task_id = task_id
        self.state = state
        self.error = error
        super().__init__(f"task {task_id} ended {state}: {error}")


class WaitTimeout(TimeoutError):
    """The caller's deadline passed before the tasks it waits for finished; `task_ids` are
    the ones still not finished (follow them again with watch / `qm watch`)."""

    def __init__(self, task_ids: list[str], timeout_s: float):
        self.task_ids = list(task_ids)
        self.timeout_s = timeout_s
        shown = ", ".join(self.task_ids[:10]) + (
            f" and {len(self.task_ids) - 10} more" if len(self.task_ids) > 10 else ""
        )
        super().__init__(f"tasks {shown} not finished within {timeout_s:g} s")


class SoftTimeout(Exception):
    """Raised inside task code at its soft timeout (qm.SoftTimeout), if it has one.

    Catch it to clean up; the hard limit still kills the task at its deadline. Left
    uncaught, the task ends TIMED_OUT.
    """


class Retry(Exception):
    """Raise in task code to ask for another attempt (qm.Retry), after `delay_s` if given.

    It counts against the task's retry budget; once that is spent the task ends FAILED.
    """

    def __init__(self, reason: str = "the task asked to be retried", delay_s: float | None = None):
        self.delay_s = delay_s
        super().__init__(reason)


class PermanentError(Exception):
    """Raise in task code to fail at once, without retrying (qm.PermanentError)."""
