"""qm.broker.confirms.ConfirmChannel: RabbitMQ's answers reach the right publishes, and a
nack marks the channel as not to be published on again (RabbitMQBroker then opens a fresh
one: a channel refused by a quorum queue whose leader died can stay refused)."""
from __future__ import annotations

import asyncio

import pytest

from qm.broker.confirms import ConfirmChannel
from qm.errors import QueueFull


class OpenChannel:
    is_open = True


def refusal() -> Exception:
    return QueueFull("refused (basic.nack)")


def test_an_ack_confirms_its_publish_and_multiple_every_earlier_one():
    async def scenario() -> None:
        confirms = ConfirmChannel(OpenChannel())
        first, second, third = confirms.sent(), confirms.sent(), confirms.sent()
        confirms.answer(2, multiple=True, refusal=None)
        assert first.done() and second.done() and not third.done()
        assert first.result() is None and second.result() is None
        assert confirms.usable and not confirms.settled
        confirms.answer(3, multiple=False, refusal=None)
        assert third.result() is None and confirms.settled

    asyncio.run(scenario())


def test_a_nack_fails_only_its_publishes_and_retires_the_channel():
    async def scenario() -> None:
        confirms = ConfirmChannel(OpenChannel())
        first, second, third = confirms.sent(), confirms.sent(), confirms.sent()
        confirms.answer(2, multiple=True, refusal=refusal)
        for refused in (first, second):
            with pytest.raises(QueueFull, match="basic.nack"):
                refused.result()
        assert not third.done()  # still answered later, on the same channel
        assert confirms.refused and not confirms.usable
        confirms.answer(3, multiple=False, refusal=None)
        assert third.result() is None and confirms.settled

    asyncio.run(scenario())


def test_a_lost_channel_fails_every_unanswered_publish():
    async def scenario() -> None:
        confirms = ConfirmChannel(OpenChannel())
        pending = [confirms.sent() for _ in range(3)]
        confirms.answer(1, multiple=False, refusal=None)
        confirms.fail_all(ConnectionError("gone"))
        assert pending[0].result() is None
        for lost in pending[1:]:
            with pytest.raises(ConnectionError):
                lost.result()
        assert confirms.settled

    asyncio.run(scenario())
