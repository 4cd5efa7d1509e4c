"""Task events published in packs: one message and one confirm for the events that wait.

    publish(e1) ──► nothing in flight: out in the next loop turn, alone ──► confirm ─► e1's caller
    publish(e2) ─┐  (handed over while e1's confirm is awaited: they wait)
    publish(e3) ─┴► then one message packing e2, e3 (TaskEvent.packed) ──► confirm ─► both callers

Like a group commit, nothing waits for a pack to fill: one task at a time costs what it
did (its event goes out alone, unpacked, which any server reads). Events handed over in
the same loop turn (one run's outcome and the next run's start) share a message, and under
load the events that pile up behind a confirm share the next message, its confirm and the
servers' delivery. Every caller returns only once the message holding its event is
confirmed (the worker acks a task only after that), or gets the publish's error. Events
leave in the order they were handed over, progress reports included (`publish_advisory`),
so a task's RUNNING event still comes before its first report.

A server older than packs drops one as undecodable (no task_id): `worker.pack_events:
false` publishes each event alone, for a fleet whose servers are not all upgraded.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from qm._proto.qm.internal.v1 import messages_pb2
from qm.broker import topology
from qm.broker.base import Broker, publish_until_confirmed
from qm.messages import TaskEvent, pack_events
from qm.protocol import Header
from qm.states import TaskState

#: Most encoded event bytes in one pack; an event larger than that goes alone.
PACK_MAX_BYTES = 64 * 1024


class EventPacks:
    """Publishes one worker's task events, packing those that wait behind a confirm."""

    def __init__(
        self,
        broker: Broker,
        enabled: bool = True,
        max_bytes: int = PACK_MAX_BYTES,
        on_message: Callable[[int], None] | None = None,
    ) -> None:
        self.broker = broker
        self.enabled = enabled  # worker.pack_events
        self.max_bytes = max_bytes
        self.on_message = on_message  # on_message(events in it), per message confirmed
        self._waiting: list[tuple[messages_pb2.TaskEvent, asyncio.Future[None]]] = []  # event, its caller
        self._sender: asyncio.Task[None] | None = None  # while events wait or one publish is in flight

    async def publish(self, event: TaskEvent) -> None:
        """Publish `event`, waiting out RabbitMQ outages; return once the message holding it
        is confirmed."""
        await self.hand_over(event)

    def hand_over(self, event: TaskEvent) -> asyncio.Future[None]:
        """Take `event` now, behind every event handed over before it (it is published in
        that order), and return what resolves once the message holding it is confirmed."""
        if not self.enabled:  # one task each: they start, and publish, in this order
            return asyncio.ensure_future(self._send([event.to_proto()]))
        return self._take_turn(event)

    async def publish_advisory(self, event: TaskEvent) -> None:
        """A progress report: out at once, one attempt (BrokerUnavailable if RabbitMQ is
        away), unless events wait for their turn: then it follows them in their pack."""
        if not self._waiting or not self.enabled:
            headers = {Header.TASK_ID: event.task_id, Header.STATE: "PROGRESS"}
            await self.broker.publish(topology.EVENTS_EXCHANGE, "", event.encode(), headers)
            return
        if not self.broker.connected:
            raise self.broker.unavailable()
        await self._take_turn(event)

    def _take_turn(self, event: TaskEvent) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((event.to_proto(), done))
        if self._sender is None:  # it starts in the next loop turn: this turn's events go with it
            self._sender = loop.create_task(self._send_waiting(), name="event-packs")
        return done

    async def _send_waiting(self) -> None:
        """Until nothing waits: publish the longest run of waiting events that fits a pack,
        then settle their callers."""
        try:
            while self._waiting:
                group = self._take()
                try:
                    await self._send([proto for proto, _done in group])
                except BaseException as exc:
                    for _proto, done in group:
                        _settle(done, exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for _proto, done in group:
                    _settle(done, None)
        finally:
            self._sender = None
            for _proto, done in self._waiting:  # only when cancelled (stopping): nothing sends them
                done.cancel()
            self._waiting.clear()

    def _take(self) -> list[tuple[messages_pb2.TaskEvent, asyncio.Future[None]]]:
        size = 0
        count = 0
        for proto, _done in self._waiting:
            size += proto.ByteSize()
            if count and size > self.max_bytes:
                break
            count += 1
        group, self._waiting = self._waiting[:count], self._waiting[count:]
        return group

    async def _send(self, protos: list[messages_pb2.TaskEvent]) -> None:
        first = protos[0]
        if len(protos) == 1:
            headers = {Header.TASK_ID: first.task_id, Header.STATE: TaskState.of_number(first.state).name}
            body, what = first.SerializeToString(), f"task {first.task_id}"
        else:
            headers = {Header.STATE: "PACKED"}
            body, what = pack_events(protos), f"{len(protos)} task events (task {first.task_id} first)"
        await publish_until_confirmed(self.broker, topology.EVENTS_EXCHANGE, "", body, headers, what)
        if self.on_message is not None:
            self.on_message(len(protos))


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    """A caller's turn is over: its message confirmed (no error), failed, or cancelled."""
    if done.done():
        return
    if error is None:
        done.set_result(None)
    elif isinstance(error, asyncio.CancelledError):
        done.cancel()
    else:
        done.set_exception(error)
