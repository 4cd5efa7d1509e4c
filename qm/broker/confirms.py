"""One confirm-mode publishing channel and the publishes it still owes an answer for.

RabbitMQ numbers a confirm-mode channel's publishes 1, 2, 3 ... and answers each with
basic.ack or basic.nack (`multiple` covers every lower number too). A channel that got a
nack is `refused` and is not used for new publishes again (RabbitMQBroker opens a fresh
one): RabbitMQ 3.10 keeps, per channel and per quorum queue, the state of that channel's
first publish to the queue. A channel whose first publish to a quorum queue came while
the queue's leader was on a node that had just died keeps trying that node and nacks
every later publish to the queue for as long as the node stays down, though the queue
elected a new leader within a second. A fresh channel starts from the current leader.
A refused channel is closed once every publish it carries has its answer.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class ConfirmChannel:
    """A confirm-mode channel, its next sequence number and its unanswered publishes."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.refused = False  # RabbitMQ nacked a publish on it: publish on a fresh one
        self._seq = 0
        self._pending: dict[int, asyncio.Future] = {}

    @property
    def usable(self) -> bool:
        return not self.refused and self.channel.is_open

    @property
    def settled(self) -> bool:
        """Every publish on it has its answer (or was failed)."""
        return not self._pending

    def sent(self) -> asyncio.Future:
        """Register the publish just sent; its future completes with RabbitMQ's answer."""
        self._seq += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._seq] = future
        return future

    def answer(self, delivery_tag: int, multiple: bool, refusal: Callable[[], Exception] | None) -> None:
        """basic.ack (`refusal` None) or basic.nack (`refusal` makes the error) for
        `delivery_tag`, and with `multiple` for every lower number still unanswered."""
        tags = [tag for tag in self._pending if tag <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            future = self._pending.pop(tag, None)
            if future is None or future.done():
                continue
            if refusal is None:
                future.set_result(None)
            else:
                future.set_exception(refusal())
        if refusal is not None:
            self.refused = True

    def fail_all(self, error: Exception) -> None:
        """The channel or its connection is gone: every unanswered publish fails with `error`."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
