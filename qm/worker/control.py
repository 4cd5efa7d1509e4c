"""The worker's side of the control stream (`qm.cancels`): cancels and poison verdicts.

Every worker reads the stream from its start, so one started after a cancel still knows
it. Before the worker takes any task it publishes a marker of its own into the stream and
waits to read it back: every earlier cancel has been read by then.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Callable

from qm.broker import topology
from qm.broker.base import Broker, Delivery, publish_until_confirmed
from qm.protocol import Command, Control

log = logging.getLogger(__name__)

#: Longest wait to read the cancel stream up to now before taking tasks anyway.
CATCH_UP_TIMEOUT_S = 30.0
#: Unacked messages from the cancel stream the worker may hold (streams need a prefetch).
CONTROL_PREFETCH = 1000
#: How many cancelled task ids a worker remembers (to drop them if they arrive later).
CANCELLED_MEMORY = 100_000


class ControlFollower:
    """Follows the control stream; `on_cancel(task_id)` is called for each cancel read."""

    def __init__(self, broker: Broker, worker_id: str, on_cancel: Callable[[str], None]) -> None:
        self.broker = broker
        self.on_cancel = on_cancel
        self.tag = ""
        self._marker = f"{worker_id}:{uuid.uuid4()}"
        self._caught_up = asyncio.Event()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._poison: dict[str, str] = {}  # task id → starts counted by the servers

    async def start(self, catch_up_timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Follow the stream and read it up to now (bounded)."""
        cancels = await topology.declare_cancel_stream(self.broker)
        self.tag = await self.broker.consume(cancels, self._on_delivery, CONTROL_PREFETCH, topology.FROM_STREAM_START)
        body, headers = Control(Command.MARKER, self._marker).encode()
        # Waits out a connection lost meanwhile (a cluster node going away as the worker
        # starts): the consumer is replayed on the next node, and the marker follows it.
        await publish_until_confirmed(self.broker, topology.CONTROL_EXCHANGE, "", body, headers, "cancel-stream marker")
        try:
            await asyncio.wait_for(self._caught_up.wait(), catch_up_timeout_s)
        except asyncio.TimeoutError:
            log.warning("cancel stream not read to its end within %g s; starting anyway", catch_up_timeout_s)

    def is_cancelled(self, task_id: str) -> bool:
        return task_id in self._cancelled

    def poison_starts(self, task_id: str) -> str | None:
        """The servers' count of starts if they declared this task poison, else None."""
        return self._poison.get(task_id)

    def _on_delivery(self, delivery: Delivery) -> None:
        self.broker.ack(delivery)
        control = Control.decode(delivery.body, delivery.headers)
        if control is None:
            return
        if control.command is Command.MARKER:
            if control.subject == self._marker:
                self._caught_up.set()
        elif control.command is Command.POISON:
            self._poison[control.subject] = control.detail
        else:
            self._cancelled[control.subject] = None
            while len(self._cancelled) > CANCELLED_MEMORY:
                self._cancelled.popitem(last=False)
            self.on_cancel(control.subject)
