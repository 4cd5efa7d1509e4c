"""Groups with a final callback (map-reduce): SubmitGroup and GetGroupStatus.

```
 SubmitGroup(items, then) ─► validate every item and the callback (nothing stored if one is bad)
   └► store: group row + member rows (+ messages, unconfirmed), one transaction
   └► publish the members (confirms pipelined), confirm marks ─► answer group id
 member events ─► store.apply: the transaction that counts a member's first terminal state
   updates the group row; the one that counts the last stores the callback (unconfirmed)
   └► EventApplier publishes it like a crash-left unconfirmed task (start-up repairs a crash)
```

The callback is decided by the database (one row update, `completed_at IS NULL`), so it is
made once per store, even with several servers sharing PostgreSQL. Its payload is built
from the members' stored outcomes (qm/server/group_callback.py). A member that fails,
times out, crashes or is cancelled counts as finished; the callback still runs, with the
failures listed. Retries happen inside a member: RETRYING is not finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from typing import Awaitable, Callable, Sequence

from qm.broker.base import Broker
from qm.errors import (
    BrokerUnavailable,
    GroupNotFound,
    IdempotencyKeyReused,
    IdempotencyKeyTaken,
    QMError,
    StoreUnavailable,
    ValidationError,
)
from qm.ids import time_ordered_id
from qm.messages import TaskMessage
from qm.metrics import ServerMetrics
from qm.server import idempotency
from qm.server.store_api import GroupRecord, TaskRecord, TaskStore
from qm.server.submission import Submission
from qm.states import TaskState

log = logging.getLogger(__name__)

Prepare = Callable[[Submission], Awaitable[tuple[TaskRecord, TaskMessage]]]
Publish = Callable[[TaskMessage, bytes], Awaitable[None]]
PublishStored = Callable[[str], Awaitable[None]]

#: First and longest pause between two attempts to publish a callback while RabbitMQ or
#: the store is away (it stays stored unconfirmed meanwhile; a restart publishes it too).
CALLBACK_RETRY_MIN_S = 0.1
CALLBACK_RETRY_S = 5.0


@dataclasses.dataclass(frozen=True)
class GroupState:
    """What GetGroupStatus answers."""

    group: GroupRecord
    members: list[tuple[str, TaskState]]  # in member order
    callback_state: TaskState | None  # None while the callback waits for the members

    @property
    def counts(self) -> dict[TaskState, int]:
        counts: dict[TaskState, int] = {}
        for _task_id, state in self.members:
            counts[state] = counts.get(state, 0) + 1
        return counts


class Groups:
    """Accepts groups and answers their status; completion lives in the stores' `apply`."""

    def __init__(
        self,
        store: TaskStore,
        broker: Broker,
        metrics: ServerMetrics,
        prepare: Prepare,
        publish: Publish,
        publish_stored: PublishStored,
        ensure_queue: Callable[[str, int, int], Awaitable[None]],
        max_items: int,
        max_key_chars: int,
    ) -> None:
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self._prepare = prepare
        self._publish = publish
        self._publish_stored = publish_stored
        self._ensure_queue = ensure_queue
        self.max_items = max_items
        self.max_key_chars = max_key_chars
        self._pending_keys: dict[str, asyncio.Future] = {}  # keys being submitted right now

    async def submit(
        self, items: Sequence[Submission], then: Submission | None, idempotency_key: str = ""
    ) -> tuple[GroupRecord, list[str]]:
        """Accept a group: every member durable in RabbitMQ when this returns. Returns the
        group and its member ids in order (the first group's, for a repeated key)."""
        self._check_shape(items, then, idempotency_key)
        digest = _group_digest(items, then) if idempotency_key else ""
        if not idempotency_key:
            return await self._accept(items, then, "", "")
        if idempotency_key in self._pending_keys:  # a retry while the first is still on its way
            first = await asyncio.shield(self._pending_keys[idempotency_key])
            return await self._answer_duplicate(first, digest)
        existing = await self.store.find_group_by_idempotency_key(idempotency_key)
        if existing is not None:
            return await self._answer_duplicate(existing, digest)
        future = asyncio.get_running_loop().create_future()
        self._pending_keys[idempotency_key] = future
        try:
            group, task_ids = await self._accept(items, then, idempotency_key, digest)
            future.set_result(group)
            return group, task_ids
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a lone submit has no one else waiting on it
            raise
        finally:
            self._pending_keys.pop(idempotency_key, None)

    async def _accept(
        self, items: Sequence[Submission], then: Submission | None, idempotency_key: str, digest: str
    ) -> tuple[GroupRecord, list[str]]:
        prepared = [await self._prepare_item(f"items[{index}]", item) for index, item in enumerate(items)]
        callback = await self._prepare_item("then", then) if then is not None else None
        group_id = time_ordered_id()
        members = [
            (dataclasses.replace(record, group_id=group_id, group_index=index), message)
            for index, (record, message) in enumerate(prepared)
        ]
        group = GroupRecord(
            group_id,
            len(members),
            0,
            time.time(),
            None,
            callback[0].task_id if callback else "",
            callback[1].queue if callback else "",
            callback[1].encode() if callback else b"",
            idempotency_key,
            digest,
        )
        for queue, priority, cpus in sorted({(m.queue, m.priority, m.cpus) for _record, m in members}):
            await self._ensure_queue(queue, priority, cpus)  # a queue RabbitMQ refuses: nothing stored
        try:
            await self.store.insert_group(
                group, [(record, message.queue, message.encode()) for record, message in members]
            )
        except IdempotencyKeyTaken:  # another server of a shared store stored the key first
            existing = await self.store.find_group_by_idempotency_key(idempotency_key)
            if existing is None:
                raise StoreUnavailable(
                    f"group key {idempotency_key!r} is being submitted elsewhere; submit again"
                ) from None
            return await self._answer_duplicate(existing, digest)
        await self._publish_members([(record.task_id, message) for record, message in members])
        self.metrics.groups.labels("accepted").inc()
        self.metrics.group_members.inc(len(members))
        return group, [record.task_id for record, _message in members]

    def _check_shape(self, items: Sequence[Submission], then: Submission | None, key: str) -> None:
        if not items:
            raise ValidationError("items", "a group needs at least one task")
        if len(items) > self.max_items:
            raise ValidationError(
                "items",
                f"{len(items)} items exceed the limit of {self.max_items} per group (server.max_batch_items); "
                "split the work into several groups",
            )
        if len(key) > self.max_key_chars:
            raise ValidationError("idempotency_key", f"longer than {self.max_key_chars} characters")
        for index, item in enumerate(items):
            if item.idempotency_key:
                raise ValidationError(
                    f"items[{index}].idempotency_key", "a member takes the group's idempotency_key; leave it empty"
                )
        if then is not None:
            if then.idempotency_key:
                raise ValidationError("then.idempotency_key", "the callback takes the group's key; leave it empty")
            if then.delay_s or then.not_before_s is not None:
                raise ValidationError("then.delay_s", "a callback runs when the members are done; it takes no delay")

    async def _prepare_item(self, field: str, item: Submission) -> tuple[TaskRecord, TaskMessage]:
        """The item's record and message, an error naming `field` (items[3].payload)."""
        try:
            return await self._prepare(item)
        except ValidationError as exc:
            exc.field = f"{field}.{exc.field}"
            exc.args = (f"{exc.field}: {exc.message}",)
            raise

    async def _publish_members(self, members: list[tuple[str, TaskMessage]]) -> None:
        """Publish every member (their confirms pipelined); confirm each published one.
        A publish that fails leaves its member stored and unconfirmed: the client's retry
        (same key) publishes it, as does this server's next start; the error is raised."""
        outcomes = await asyncio.gather(
            *(self._publish(message, message.encode()) for _task_id, message in members), return_exceptions=True
        )
        failed: BaseException | None = None
        for (task_id, _message), outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed = failed or outcome
            else:
                await self.store.confirm(task_id)
        if failed is not None:
            raise failed

    async def _answer_duplicate(self, existing: GroupRecord, digest: str) -> tuple[GroupRecord, list[str]]:
        """A repeated SubmitGroup: the first group, once each of its members is durable."""
        try:
            idempotency.check_reuse(existing.idempotency_key, existing.request_digest, digest, existing.group_id)
        except IdempotencyKeyReused:
            self.metrics.groups.labels("key_reused").inc()
            raise
        members = await self.store.group_members(existing.group_id)
        for task_id, _state in members:
            for _stored_id, _queue, body in await self.store.unconfirmed(task_id):
                await self._publish_members([(task_id, TaskMessage.decode(body))])
        self.metrics.groups.labels("duplicate").inc()
        return existing, [task_id for task_id, _state in members]

    async def status(self, group_id: str) -> GroupState:
        group = await self.store.get_group(group_id)
        if group is None:
            raise GroupNotFound(group_id)
        callback_state = None
        if group.callback_task_id:
            callback = await self.store.get(group.callback_task_id)
            callback_state = callback.state if callback is not None else None
        return GroupState(group, await self.store.group_members(group_id), callback_state)

    async def publish_callback(self, record: TaskRecord) -> None:
        """Publish a callback the store just made (stored unconfirmed with it), trying
        again while RabbitMQ or the store is away; a crash meanwhile leaves it to the next
        start (`TaskService._publish_unconfirmed_until_done`). Then count it."""
        delay_s = CALLBACK_RETRY_MIN_S
        while True:
            try:
                await self._publish_stored(record.task_id)
                break
            except BrokerUnavailable as exc:  # down, or refusing (a full queue): wait, then again
                log.warning("group %s: callback %s waits for RabbitMQ: %s", record.group_id, record.task_id, exc)
                await self.broker.wait_connected(CALLBACK_RETRY_S)
            except QMError as exc:  # the store away, or RabbitMQ refusing the queue: again, later
                log.warning("group %s: callback %s not yet published: %s", record.group_id, record.task_id, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, CALLBACK_RETRY_S)
        log.info(
            "group %s: every member finished; callback %s (%s) queued", record.group_id, record.task_id, record.type
        )
        try:
            group = await self.store.get_group(record.group_id)
            members = await self.store.group_members(record.group_id)
        except StoreUnavailable:
            return  # only the metrics miss it
        failed = any(state is not TaskState.SUCCEEDED for _task_id, state in members)
        self.metrics.group_callbacks.labels("with_failures" if failed else "all_succeeded").inc()
        if group is not None and group.completed_at is not None:
            self.metrics.group_seconds.observe(max(0.0, group.completed_at - group.created_at))


def _group_digest(items: Sequence[Submission], then: Submission | None) -> str:
    """A digest of the whole group request (each item's request digest, and the callback's)."""
    hasher = hashlib.sha256()
    for item in [*items, *([then] if then is not None else [None])]:
        hasher.update(_item_digest(item).encode() + b"\n")
    return f"group1:{hasher.hexdigest()}"  # versioned, as idempotency.check_reuse compares them


def _item_digest(item: Submission | None) -> str:
    return "no callback" if item is None else idempotency.submission_digest(item)
