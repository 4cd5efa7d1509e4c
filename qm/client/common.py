"""What qm.Client (blocking) and qm.aio.Client (asyncio) share, free of any I/O.

Each client is a thin loop around these pieces: it makes the gRPC calls and sleeps (with
time.sleep or asyncio.sleep) for as long as the pieces here say.

    request building  submit_request, batch_requests, Batch (chunks, per-item outcomes)
    conversion        status_from_proto, workers/task types/dead letters from their protos,
                      into dataclasses whose states are qm.states.TaskState
    errors            RemoteError (a gRPC status and qm-server's reason code, worded for a
                      user), BatchError, WaitTimeout
    retries           Attempts: one call's tries over the server addresses (fail over at
                      once to the next address, back off after a whole round) within a window
    resume            Follow: the state of a watch over many tasks: which ids are still open,
                      which states were delivered (a resumed stream starts with each task's
                      current state, so nothing is missed and nothing is delivered twice)

Addresses: `server` is one HOST:PORT or several, comma-separated ("a:50051,b:50051"); every
call starts at the address that last answered and fails over to the next on UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from qm._proto.qm.v1 import task_queue_pb2
from qm.codecs import decode_result, encode_payload
from qm.config import parse_host_port
from qm.errors import BatchError, QMError, RefusedItem, TaskError, WaitTimeout
from qm.ids import time_ordered_id
from qm.reasons import DOMAIN, Reason, parse_reason
from qm.states import TERMINAL_STATES, TaskState

#: Deadline of unary calls (submit, status, ...).
DEFAULT_CALL_TIMEOUT_S = 30.0
#: How long submit and submit_many keep retrying while no server (or its broker) is available.
DEFAULT_SUBMIT_RETRY_S = 30.0
#: How long a wait (watch, result, results) that has reached a server keeps reconnecting
#: while none answers (a restart, a deploy), unless the caller's own deadline ends it sooner.
DEFAULT_RECONNECT_S = 60.0
#: Backoff between rounds over the server addresses: doubling from the first to the cap.
RETRY_INITIAL_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 2.0
#: Items per SubmitTasks call (the server refuses more than server.max_batch_items, default 1000).
DEFAULT_BATCH_ITEMS = 500
#: Bytes of items per SubmitTasks call, under gRPC's 4 MiB message limit.
MAX_BATCH_BYTES = 3 * 1024 * 1024
#: Unary calls one asyncio client keeps in flight at once; more wait their turn on the
#: client, where waiting costs nothing. `asyncio.gather` over thousands of submits would
#: otherwise pile them all into qm-server at once: refused past server.max_concurrent_rpcs
#: (RESOURCE_EXHAUSTED, retried after the hint), or, from servers whose gRPC core still
#: sheds pending calls (grpc.server.max_pending_requests), dropped as CANCELLED.
DEFAULT_MAX_IN_FLIGHT = 256
#: Task ids per StreamTaskResultsRequest message when following many.
FOLLOW_IDS_PER_REQUEST = 1000
#: Most task ids one StreamTaskResults stream follows: the servers refuse a stream past
#: `server.max_stream_ids` (10,000 by default), so a wait over more takes several streams.
FOLLOW_IDS_PER_STREAM = 10_000
#: gRPC channel options: after a server restart, reconnect within about a second rather than
#: gRPC's default backoff (up to 120 s), so a resumed wait sees the new process soon.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))

#: Kept for code written against 0.2: qm.states.TERMINAL_STATES, whose states equal their names.
TERMINAL_STATE_NAMES = TERMINAL_STATES
#: Codes after which a call is tried again on the next address (the server could not be
#: reached, went away, or its broker is down: nothing was done, or a retry with the same
#: idempotency key finds it done).
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Codes a submit (and each call of submit_many) is retried on, always with the same
#: idempotency keys (so never enqueued twice): the server or its broker unreachable, the
#: server overloaded (RESOURCE_EXHAUSTED, with a retry-pushback-ms hint), or a call that
#: ended without an answer (CANCELLED, DEADLINE_EXCEEDED: the task may or may not have
#: been accepted; the key settles it).
SUBMIT_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
#: Trailing metadata key of the server's retry hint, in milliseconds.
RETRY_PUSHBACK_KEY = "retry-pushback-ms"


# -- errors ------------------------------------------------------------------------------


class RemoteError(QMError):
    """qm-server answered with an error status (or could not be reached).

    `reason`: qm-server's reason code (a qm.reasons.Reason, e.g. "BROKER_UNAVAILABLE"),
    None for an error from gRPC itself (qm-server not reached, deadline, cancelled).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        server: str,
        retry_after_s: float | None = None,
        reason: str | None = None,
    ):
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s  # the server's retry hint, if it gave one
        self.reason = reason
        # UNAVAILABLE with a reason is qm-server's own answer (its broker is away); without
        # one, gRPC could not reach qm-server.
        if code is grpc.StatusCode.UNAVAILABLE and reason is None:
            details = (
                f"cannot reach qm-server at {server} ({details}); is it running? "
                "Point --server / QM_CLIENT__SERVER at it"
            )
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"qm-server at {server} did not answer in time ({details})"
        super().__init__(details)


def retry_pushback_s(trailing_metadata) -> float | None:
    """The server's retry hint in seconds (from `retry-pushback-ms`), or None."""
    for key, value in trailing_metadata or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


def error_reason(error: grpc.RpcError) -> str | None:
    """qm-server's reason code on an error (its ErrorInfo in the status details), or None:
    an error gRPC raised without reaching qm-server carries none. Works on the errors of
    grpc and grpc.aio calls alike."""
    return error_info(error)[0]


def error_info(error: grpc.RpcError) -> tuple[str | None, dict[str, str]]:
    """qm-server's reason code on an error and its ErrorInfo metadata (what the error is
    about: "field", "task_id", "max_stream_ids"...); (None, {}) for an error without one."""
    try:
        status = rpc_status.from_call(error)  # an RpcError of a call is that call
    except ValueError:  # details that do not match the status: not qm-server's
        return None, {}
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
            return parse_reason(info.reason), dict(info.metadata)
    return None, {}


def stream_error(error: grpc.RpcError) -> tuple[grpc.StatusCode, str | None, str | None, int | None]:
    """How a results stream ended in error, as Follow.interrupted takes it: the code, the
    details, qm-server's reason code and the server's stream_ids_limit."""
    reason, metadata = error_info(error)
    return error.code(), error.details(), reason, _stream_ids_limit(reason, metadata)


def stream_ids_limit(error: grpc.RpcError) -> int | None:
    """The ids one stream may follow, from a server that refused a stream for naming more
    (its server.max_stream_ids, in the error's metadata); None for any other error."""
    return _stream_ids_limit(*error_info(error))


def _stream_ids_limit(reason: str | None, metadata: dict[str, str]) -> int | None:
    try:
        limit = int(metadata["max_stream_ids"]) if reason == Reason.INVALID_FIELD else 0
    except (KeyError, ValueError):
        return None
    return limit if limit > 0 else None


# -- addresses and retries ---------------------------------------------------------------


def parse_servers(server: str | Sequence[str]) -> list[str]:
    """ "a:1,b:2" (or a list) → ["a:1", "b:2"]; ValueError naming a malformed address."""
    parts = server.split(",") if isinstance(server, str) else list(server)
    addresses = [part.strip() for part in parts if part.strip()]
    if not addresses:
        raise ValueError(f"no qm-server address in {server!r}; expected HOST:PORT[,HOST:PORT...]")
    for address in addresses:
        parse_host_port(address)
    return list(dict.fromkeys(addresses))


class Failover:
    """The server addresses and which one calls go to: the last that answered. `reached`:
    whether any server ever answered this client (before that, a wait fails at once: a
    wrong address or nothing running; after, it rides out a server's restart)."""

    def __init__(self, addresses: Sequence[str]):
        self.addresses = list(addresses)
        self.reached = False
        self._current = 0

    @property
    def current(self) -> str:
        return self.addresses[self._current]

    def failed(self, address: str) -> None:
        """`address` did not answer: move on to the next one, unless another call already did."""
        if self.addresses[self._current] == address:
            self._current = (self._current + 1) % len(self.addresses)

    def describe(self) -> str:
        return ", ".join(self.addresses)


class Attempts:
    """One call's tries: the current address, then at once each other one; after a whole
    round without an answer, a pause (the server's retry hint if it gave one, else doubling
    up to RETRY_MAX_DELAY_S), and another round while `window_s` lasts. A window of 0 is
    one round, no pause. Only `retry_codes` are tried again. `reached()` (the server
    answered) opens the window again: a stream that was connected may lose its server for
    `window_s` before it gives up."""

    def __init__(
        self,
        failover: Failover,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        retry_codes: frozenset = FAILOVER_CODES,
    ):
        self.failover = failover
        self.window_s = window_s
        self.retry_codes = retry_codes
        self._clock = clock
        self._deadline = clock() + window_s
        self._failures = 0
        self._delay_s = RETRY_INITIAL_DELAY_S

    @property
    def address(self) -> str:
        return self.failover.current

    def reached(self) -> None:
        """The server answered."""
        self.failover.reached = True
        self._failures = 0
        self._delay_s = RETRY_INITIAL_DELAY_S
        self._deadline = self._clock() + self.window_s

    def failed(
        self,
        address: str,
        code: grpc.StatusCode,
        details: str,
        retry_after_s: float | None = None,
        reason: str | None = None,
    ) -> float:
        """The call to `address` failed with `code` (the server's retry hint: `retry_after_s`,
        its reason code: `reason`): the pause before the next try, or RemoteError if the
        code is not one to retry or the window is spent."""
        if code not in self.retry_codes:
            raise RemoteError(code, details or "", address, retry_after_s, reason)
        self.failover.failed(address)
        self._failures += 1
        if self._failures % len(self.failover.addresses):
            return 0.0  # addresses left in this round
        delay_s, self._delay_s = self._delay_s, min(self._delay_s * 2, RETRY_MAX_DELAY_S)
        if retry_after_s is not None:
            delay_s = retry_after_s
        if self._clock() + delay_s > self._deadline:
            where = self.failover.describe()
            tried = f"{details or code.name}; tried for {self.window_s:g} s" if self.window_s else details
            raise RemoteError(code, tried or "", where, retry_after_s, reason)
        return delay_s


# -- submitting --------------------------------------------------------------------------

#: SubmitTaskRequest's optional fields (None = the task type's, else the server's default).
_OPTIONAL_FIELDS = ("max_retries", "retry_backoff_s", "retry_backoff_max_s", "retry_jitter", "retry_on_timeout")
#: Options submit and submit_many take.
SUBMIT_OPTIONS = (
    "queue",
    "timeout_s",
    "soft_timeout_s",
    "memory_limit_mb",
    *_OPTIONAL_FIELDS,
    "idempotency_key",
    "delay_s",
    "not_before",
    "priority",
    "cpus",
)

#: The two ways of asking for a delay (qm/scheduling.py); a submission takes one.
_DELAY_OPTIONS = frozenset({"delay_s", "not_before"})


def submit_request(
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
) -> task_queue_pb2.SubmitTaskRequest:
    """The request of one submit; it always carries an idempotency key (a fresh one unless
    given), so retrying it can never enqueue the task twice. `delay_s` or `not_before`
    (seconds since the epoch) make it a delayed task. `priority` 0-9, higher first (None:
    the task type's default); the server refuses one above 9, one that cannot be sent at
    all (negative, not a whole number) is a ValueError here. `cpus`: CPU slots it takes on
    a worker (0 = the task type's, else 1)."""
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int) or priority < 0):
        raise ValueError(f"priority: must be a whole number from 0 (lowest) to 9 (highest), got {priority!r}")
    request = task_queue_pb2.SubmitTaskRequest(
        type=type,
        payload=encode_payload(payload),
        queue=queue,
        timeout_s=timeout_s,
        memory_limit_mb=memory_limit_mb,
        idempotency_key=idempotency_key or time_ordered_id(),
        soft_timeout_s=soft_timeout_s,
        cpus=cpus,
    )
    optional = dict(
        max_retries=max_retries,
        retry_backoff_s=retry_backoff_s,
        retry_backoff_max_s=retry_backoff_max_s,
        retry_jitter=retry_jitter,
        retry_on_timeout=retry_on_timeout,
        delay_s=delay_s,
        priority=priority,
    )
    if not_before is not None:
        request.not_before.FromNanoseconds(int(not_before * 1e9))
    for field, value in optional.items():
        if value is not None:
            setattr(request, field, value)
    return request


def batch_requests(items: Iterable[tuple], options: dict[str, Any]) -> list[task_queue_pb2.SubmitTaskRequest]:
    """One request per item: `(type, payload)` or `(type, payload, {option: value})`, the
    item's own options over the batch's (an item's `delay_s` or `not_before` replaces the
    batch's either). A batch `idempotency_key` K gives item i the key
    "K/i" (so the same batch sent again is the same tasks); else each item gets a fresh key."""
    unknown = set(options) - set(SUBMIT_OPTIONS)
    if unknown:
        raise TypeError(f"submit_many() got unexpected options: {', '.join(sorted(unknown))}")
    batch_key = options.get("idempotency_key")
    requests = []
    for index, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise TypeError(f"item {index}: expected (type, payload) or (type, payload, options), got {item!r}")
        own = dict(item[2]) if len(item) == 3 else {}
        batch = (
            options
            if not _DELAY_OPTIONS & own.keys()
            else {  # an item's own delay replaces the batch's
                name: value for name, value in options.items() if name not in _DELAY_OPTIONS
            }
        )
        merged = {**batch, **own}
        if "idempotency_key" not in own and batch_key:
            merged["idempotency_key"] = f"{batch_key}/{index}"
        requests.append(submit_request(item[0], item[1], **merged))
    return requests


# -- periodic schedules --------------------------------------------------------------------

#: Missed-ticks policies by name ↔ qm.v1.ScheduleMissedTicks.
MISSED_TICKS = {
    "coalesce": task_queue_pb2.SCHEDULE_MISSED_TICKS_COALESCE,
    "skip": task_queue_pb2.SCHEDULE_MISSED_TICKS_SKIP,
}


def add_schedule_request(
    type: str,
    payload: Any,
    *,
    cron: str | None = None,
    every_s: float | None = None,
    timezone: str = "UTC",
    missed: str = "coalesce",
    schedule_id: str | None = None,
    **options,
) -> task_queue_pb2.AddScheduleRequest:
    """The AddSchedule request: when (`cron` or `every_s`), the missed-ticks policy, and the
    task each tick submits (`options` as submit's, without a key or a delay). It always
    carries a schedule id (a fresh one unless given), so retrying it adds one schedule."""
    for refused in ("idempotency_key", "delay_s", "not_before"):
        if options.get(refused) is not None:
            raise TypeError(
                f"add_schedule() takes no {refused}: each tick's task gets its own key and runs at its tick"
            )
    if missed not in MISSED_TICKS:
        raise ValueError(f"missed must be one of {', '.join(MISSED_TICKS)}, got {missed!r}")
    task = submit_request(type, payload, **options)
    task.ClearField("idempotency_key")
    return task_queue_pb2.AddScheduleRequest(
        schedule_id=schedule_id or f"sch-{uuid.uuid4().hex[:12]}",
        cron=cron or "",
        every_s=every_s or 0.0,
        timezone=timezone,
        missed_ticks=MISSED_TICKS[missed],
        task=task,
    )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A periodic schedule as stored: when (`cron` in `timezone`, or `every_s`), the task
    each tick submits, and what it did last (times in seconds since the epoch)."""

    schedule_id: str
    cron: str
    every_s: float
    timezone: str
    missed: str  # coalesce or skip
    type: str
    payload: Any  # as the task type's codec reads it back (text, JSON, bytes)
    queue: str
    created_at: float | None
    next_fire_at: float | None
    last_fired_at: float | None  # the tick that fired last
    last_task_id: str
    fires: int
    missed_ticks: int  # ticks that fired nothing of their own (coalesced, skipped, refused)
    last_error: str

    @property
    def when(self) -> str:
        if self.every_s:
            return f"every {self.every_s:g}s"
        return self.cron + ("" if self.timezone == "UTC" else f" ({self.timezone})")


def schedule_from_proto(proto: task_queue_pb2.Schedule) -> Schedule:
    names = {number: name for name, number in MISSED_TICKS.items()}
    payload = proto.task.payload
    try:
        shown: Any = payload.decode("utf-8")
    except UnicodeDecodeError:
        shown = payload
    return Schedule(
        proto.schedule_id,
        proto.cron,
        proto.every_s,
        proto.timezone,
        names.get(proto.missed_ticks, "coalesce"),
        proto.task.type,
        shown,
        proto.task.queue,
        _seconds(proto.created_at),
        _seconds(proto.next_fire_at),
        _seconds(proto.last_fired_at),
        proto.last_task_id,
        proto.fires,
        proto.missed,
        proto.last_error,
    )


class Batch:
    """submit_many's items across SubmitTasks calls: chunks under the count and size caps,
    each item's outcome, and which items to send again (refused UNAVAILABLE: the server's
    broker was away; their idempotency keys make the retry safe)."""

    def __init__(
        self,
        requests: list[task_queue_pb2.SubmitTaskRequest],
        max_items: int = DEFAULT_BATCH_ITEMS,
        max_bytes: int = MAX_BATCH_BYTES,
    ):
        self.requests = requests
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.task_ids: list[str | None] = [None] * len(requests)
        self.refused: dict[int, RefusedItem] = {}

    def chunks(self) -> Iterator[list[int]]:
        """Indexes of the items, in order, in chunks of at most max_items and max_bytes."""
        chunk: list[int] = []
        size = 0
        for index, request in enumerate(self.requests):
            item_size = request.ByteSize() + 8
            if chunk and (len(chunk) >= self.max_items or size + item_size > self.max_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(index)
            size += item_size
        if chunk:
            yield chunk

    def request(self, indexes: list[int]) -> task_queue_pb2.SubmitTasksRequest:
        return task_queue_pb2.SubmitTasksRequest(items=[self.requests[i] for i in indexes])

    def record(self, indexes: list[int], response: task_queue_pb2.SubmitTasksResponse) -> list[int]:
        """Take a response to `request(indexes)`; return the items to send again."""
        if len(response.results) != len(indexes):
            raise QMError(f"qm-server answered {len(response.results)} results for {len(indexes)} items")
        again = []
        for index, result in zip(indexes, response.results, strict=True):
            code = grpc.StatusCode.OK if result.code == 0 else status_code(result.code)
            if code is grpc.StatusCode.OK:
                self.task_ids[index] = result.task_id
                self.refused.pop(index, None)
            else:
                self.refuse([index], code, result.message, parse_reason(result.reason))
                if code in FAILOVER_CODES:
                    again.append(index)
        return again

    def refuse(self, indexes: Iterable[int], code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        for index in indexes:
            self.refused[index] = RefusedItem(index, self.requests[index].type, code.name, message, reason)

    def give_up(self, error: RemoteError) -> None:
        """A call failed for good: re-raise it if nothing was accepted, else every item not
        accepted (nor refused for a reason of its own) is refused with it."""
        if all(task_id is None for task_id in self.task_ids):
            raise error
        for index, task_id in enumerate(self.task_ids):
            refused = self.refused.get(index)
            if task_id is None and (refused is None or refused.code == grpc.StatusCode.UNAVAILABLE.name):
                self.refused[index] = RefusedItem(
                    index, self.requests[index].type, error.code.name, str(error), error.reason
                )

    def task_ids_or_raise(self) -> list[str]:
        """The ids in order, or BatchError naming each refused item (accepted ids on it)."""
        if self.refused:
            raise BatchError(self.task_ids, [self.refused[index] for index in sorted(self.refused)])
        return list(self.task_ids)  # type: ignore[arg-type]


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code of its number (as SubmitTasksResult.code carries it)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


# -- statuses ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskStatus:
    """A task's state as the server reports it; times are seconds since the epoch or None."""

    task_id: str
    type: str
    queue: str
    state: TaskState  # a str-enum: == "SUCCEEDED" holds too
    attempts: int
    result: Any
    error: str
    worker: str
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    timeout_s: float = 0.0  # effective hard time limit
    memory_limit_mb: int = 0  # effective memory limit; 0 = none
    max_retries: int = 0  # effective retry budget
    next_attempt_at: float | None = None  # while RETRYING; while SCHEDULED (or QUEUED after it): when due
    progress: float = 0.0  # 0..1, the latest qm.progress() of the current attempt
    progress_message: str = ""
    progress_detail: Any = None  # its JSON detail, decoded; None if none
    progress_at: float | None = None  # when that report was made
    priority: int = 5  # 0-9, higher runs first (qm/priority.py)
    cpus: int = 1  # CPU slots it takes on a worker
    schedule_id: str = ""  # the periodic schedule that submitted it, if one did
    group_id: str = ""  # the group (submit_group) it is a member or the callback of

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: "id" first, the state by name, bytes results in hex (`qm status --json`)."""
        data = dataclasses.asdict(self)
        data = {"id": data.pop("task_id"), **data, "state": self.state.value}
        if isinstance(self.result, bytes):
            data["result"] = self.result.hex()
        return data


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A task whose last attempt failed for good; `reason`: why it was dead-lettered."""

    task_id: str
    type: str
    queue: str
    state: TaskState
    attempts: int
    reason: str
    error: str
    dead_at: float | None


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker the server has heard from; state: active, draining, stopped or lost;
    last_seen: seconds since the epoch."""

    worker_id: str
    host: str
    pid: int
    procs: int
    busy: int
    queues: list[str]
    types: list[str]
    version: str
    state: str
    last_seen: float | None
    busy_cpus: int = 0  # CPU slots held by its running tasks, out of procs


@dataclasses.dataclass(frozen=True)
class TaskTypeInfo:
    """A task type the server accepts: codec, description, limits (0: none)."""

    name: str
    codec: str
    description: str
    default_timeout_s: float
    max_timeout_s: float
    default_memory_limit_mb: int
    max_memory_limit_mb: int
    default_max_retries: int
    default_priority: int = 5  # what a submission without priority gets, 0-9 (higher first)
    cpus: int = 1  # CPU slots a submission without cpus takes


def _seconds(timestamp) -> float | None:
    return timestamp.ToNanoseconds() / 1e9 if timestamp.ByteSize() else None


def status_from_proto(status: task_queue_pb2.TaskStatus) -> TaskStatus:
    return TaskStatus(
        task_id=status.task_id,
        type=status.type,
        queue=status.queue,
        state=TaskState.of_number(status.state),
        attempts=status.attempts,
        result=(
            decode_result(status.codec, status.result) if status.state == task_queue_pb2.TASK_STATE_SUCCEEDED else None
        ),
        error=status.error,
        worker=status.worker,
        created_at=_seconds(status.created_at),
        started_at=_seconds(status.started_at),
        finished_at=_seconds(status.finished_at),
        updated_at=_seconds(status.updated_at),
        timeout_s=status.timeout_s,
        memory_limit_mb=status.memory_limit_mb,
        max_retries=status.max_retries,
        next_attempt_at=_seconds(status.next_attempt_at),
        progress=status.progress,
        progress_message=status.progress_message,
        progress_detail=_json_or_none(status.progress_detail_json),
        progress_at=_seconds(status.progress_at),
        priority=status.priority,
        cpus=status.cpus or 1,
        schedule_id=status.schedule_id,
        group_id=status.group_id,
    )


@dataclasses.dataclass(frozen=True)
class GroupStatus:
    """A group (submit_group): its members per state and its callback."""

    group_id: str
    members: int
    finished: int  # members in a terminal state
    counts: dict[TaskState, int]  # members per current state
    callback_task_id: str  # "" without a callback
    callback_state: TaskState | None  # None while it waits for the members (or without one)
    created_at: float | None
    completed_at: float | None  # when the last member finished
    task_ids: list[str]  # the members, in the order submitted

    @property
    def done(self) -> bool:
        """Every member finished and the callback (if any) too."""
        callback_done = not self.callback_task_id or (self.callback_state is not None and self.callback_state.terminal)
        return self.finished == self.members and callback_done

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (`qm status GROUP_ID --json`): states by name."""
        return {
            "group_id": self.group_id,
            "members": self.members,
            "finished": self.finished,
            "counts": {state.value: count for state, count in self.counts.items()},
            "callback_task_id": self.callback_task_id,
            "callback_state": self.callback_state.value if self.callback_state else None,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "task_ids": self.task_ids,
        }


def group_status_from_proto(status: task_queue_pb2.GroupStatus) -> GroupStatus:
    return GroupStatus(
        group_id=status.group_id,
        members=status.members,
        finished=status.finished,
        counts={TaskState.of_number(count.state): count.count for count in status.counts},
        callback_task_id=status.callback_task_id,
        callback_state=TaskState.of_number(status.callback_state) if status.callback_state else None,
        created_at=_seconds(status.created_at),
        completed_at=_seconds(status.completed_at),
        task_ids=list(status.task_ids),
    )


def group_request(
    items: Iterable[tuple], then: tuple | None, options: dict[str, Any], idempotency_key: str | None
) -> task_queue_pb2.SubmitGroupRequest:
    """A SubmitGroup request: items and `then` as submit_many's items, `options` for every
    member; the callback takes only the `queue` of them (its own options in its tuple win).
    It always carries a group idempotency key (a fresh one unless given); members and
    callback carry none."""
    if "idempotency_key" in options:
        raise TypeError("submit_group(): pass idempotency_key as its own argument (it is the group's)")
    request = task_queue_pb2.SubmitGroupRequest(
        items=batch_requests(items, options), idempotency_key=idempotency_key or time_ordered_id()
    )
    if then is not None:
        queue = {"queue": options["queue"]} if options.get("queue") else {}
        request.then.CopyFrom(batch_requests([then], queue)[0])
        request.then.idempotency_key = ""
    for item in request.items:
        item.idempotency_key = ""
    return request


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None  # the server stores what a worker sent: a bad one is no reason to fail a watch


def final_value(task_id: str, last: TaskStatus | None) -> Any:
    """What result() returns for a task whose last status is `last`: its result, or TaskError."""
    if last is None or not last.terminal:  # the server ends a stream only at a final state
        raise QMError(f"status stream for task {task_id} ended before the task did")
    if last.state is not TaskState.SUCCEEDED:
        raise TaskError(task_id, last.state, last.error)
    return last.result


def workers_from_proto(response: task_queue_pb2.ListWorkersResponse) -> list[WorkerInfo]:
    return [
        WorkerInfo(
            w.worker_id,
            w.host,
            w.pid,
            w.procs,
            w.busy,
            list(w.queues),
            list(w.types),
            w.version,
            w.state,
            _seconds(w.last_seen),
            w.busy_cpus,
        )
        for w in response.workers
    ]


def task_types_from_proto(response: task_queue_pb2.ListTaskTypesResponse) -> tuple[list[TaskTypeInfo], list[str]]:
    types = [
        TaskTypeInfo(
            t.name,
            t.codec,
            t.description,
            t.default_timeout_s,
            t.max_timeout_s,
            t.default_memory_limit_mb,
            t.max_memory_limit_mb,
            t.default_max_retries,
            t.default_priority,
            t.cpus or 1,
        )
        for t in response.types
    ]
    return types, list(response.plugin_errors)


def dead_letters_from_proto(response: task_queue_pb2.ListDeadLettersResponse) -> tuple[list[DeadLetter], int]:
    letters = [
        DeadLetter(
            d.task_id, d.type, d.queue, TaskState.of_number(d.state), d.attempts, d.reason, d.error, _seconds(d.dead_at)
        )
        for d in response.dead_letters
    ]
    return letters, response.total


# -- following tasks, across server restarts -----------------------------------------------


def response_statuses(
    response: task_queue_pb2.StreamTaskResultsResponse,
) -> Sequence[task_queue_pb2.TaskStatus]:
    """A stream response's statuses: `statuses` (a batched stream), else its one `status`
    (a server older than StreamTaskResultsRequest.batched)."""
    return response.statuses or (response.status,)


class Follow:
    """One wait over tasks (watch, result, results), over as many streams as it takes.

    A stream follows at most `stream_ids` ids (the servers' `server.max_stream_ids`): the
    first ones still open. When all of those are terminal the server ends the stream
    cleanly and the next stream takes the next ids (`window_done`), at once: the ids of
    a later window are followed from their current state, so none is missed.

    A stream that ends before every task is terminal (UNAVAILABLE: the server was killed or
    is restarting; or a clean end: it is shutting down) is opened again, on the next
    address, with the ids still open; the server sends each one's current state first, so
    nothing is missed, and states already delivered are skipped. A client no server ever
    answered fails after one round over the addresses (a wrong address fails at once);
    once one has, a wait rides out up to `reconnect_s` without any server, and the
    caller's `timeout_s` bounds everything (WaitTimeout).
    """

    def __init__(
        self,
        task_ids: Iterable[str],
        failover: Failover,
        timeout_s: float | None,
        reconnect_s: float,
        clock: Callable[[], float] = time.monotonic,
        final_only: bool = False,
        stream_ids: int = FOLLOW_IDS_PER_STREAM,
    ):
        if stream_ids < 1:
            raise ValueError(f"stream_ids must be at least 1, got {stream_ids}")
        self.open = dict.fromkeys(task_ids)  # ids not yet terminal, in order
        self.stream_ids = stream_ids
        self._window: list[str] = []  # the ids the latest stream follows
        self.final_only = final_only  # the server sends final states only (results, result)
        self.timeout_s = timeout_s
        self._delivered: dict[str, set[tuple]] = {}
        self._progress_ns: dict[str, int] = {}  # task id → time of the latest progress delivered
        self._clock = clock
        self._deadline = None if timeout_s is None else clock() + timeout_s
        self._attempts = Attempts(failover, reconnect_s if failover.reached else 0.0, clock)
        self._reconnect_s = reconnect_s
        self.resumed = 0  # streams opened again

    @property
    def done(self) -> bool:
        return not self.open

    @property
    def address(self) -> str:
        return self._attempts.address

    @property
    def window_done(self) -> bool:
        """Every id the latest stream followed is terminal, and others are still open: a
        stream that ended cleanly did its share; the next one follows the next ids."""
        return bool(self.open) and not any(task_id in self.open for task_id in self._window)

    def requests(self) -> list[task_queue_pb2.StreamTaskResultsRequest]:
        """The requests of a new stream: the first `stream_ids` ids still open."""
        ids = self._window = list(itertools.islice(self.open, self.stream_ids))
        return [
            task_queue_pb2.StreamTaskResultsRequest(
                task_ids=ids[i : i + FOLLOW_IDS_PER_REQUEST], final_only=self.final_only, batched=True
            )
            for i in range(0, len(ids), FOLLOW_IDS_PER_REQUEST)
        ]

    def call_timeout(self) -> float | None:
        """The stream's gRPC deadline: what is left of the caller's; WaitTimeout if nothing is."""
        if self._deadline is None:
            return None
        left = self._deadline - self._clock()
        if left <= 0:
            raise self.timed_out()
        return left

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(list(self.open), self.timeout_s or 0.0)

    def accept(self, proto: task_queue_pb2.TaskStatus) -> TaskStatus | None:
        """A status from the stream: the TaskStatus to deliver, or None if already delivered."""
        self._server_answered()
        key = (proto.state, proto.attempts, proto.updated_at.seconds, proto.updated_at.nanos)
        seen = self._delivered.setdefault(proto.task_id, set())
        # Progress reports: only the time of the latest delivered is kept (there may be many).
        progress_ns = proto.progress_at.ToNanoseconds() if proto.progress_at.ByteSize() else 0
        newer_progress = progress_ns > self._progress_ns.get(proto.task_id, 0)
        if proto.task_id not in self.open or (key in seen and not newer_progress):
            return None
        seen.add(key)
        self._progress_ns[proto.task_id] = progress_ns
        status = status_from_proto(proto)
        if status.terminal:
            del self.open[proto.task_id]
            self._delivered.pop(proto.task_id, None)
            self._progress_ns.pop(proto.task_id, None)
        return status

    def _server_answered(self) -> None:
        """A server answered: from now on ride out its loss for `reconnect_s`."""
        self._attempts.window_s = self._reconnect_s
        self._attempts.reached()

    def interrupted(
        self,
        address: str,
        code: grpc.StatusCode | None,
        details: str | None,
        reason: str | None = None,
        limit: int | None = None,
    ) -> float:
        """The stream from `address` ended (code None: cleanly; `reason`: qm-server's reason
        code) with tasks still open: the pause before opening it again; raises WaitTimeout
        or RemoteError when it cannot go on. `limit`: the server refused the stream for
        following more than that many ids (stream_ids_limit): the next streams follow that
        many, at once."""
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self.timed_out()
        if limit is not None and limit < self.stream_ids:
            # The server lets a stream follow fewer ids than this client sent (a lower
            # server.max_stream_ids): the rest goes on further streams of its size.
            self.stream_ids = limit
            self._server_answered()
            self.resumed += 1
            return 0.0
        if reason == Reason.STREAM_EXPIRED:
            # The server ended a live stream at its lifetime (server.max_stream_s): it is
            # there. A wait for final states may have heard nothing for that long, so the
            # reconnect window must not count from the last status.
            self._server_answered()
        delay_s = self._attempts.failed(
            address,
            code or grpc.StatusCode.UNAVAILABLE,
            details or "the stream ended before the tasks did",
            reason=reason,
        )
        if self._deadline is not None and self._clock() + delay_s >= self._deadline:
            raise self.timed_out()
        self.resumed += 1
        return delay_s
