"""One socket send per burst of AMQP frames, not one per frame (issue 9).

pika's asyncio transport queues every frame it is handed (a basic.publish is three:
method, header, body; a basic.ack one) and, once the socket is writable, sends them
with one `send` each: three system calls and three TCP segments for one publish, each
read and parsed by RabbitMQ on its own. `join_queued_frames()` makes the transport join
what is queued, up to JOIN_MAX_BYTES at a time, before it sends: the bytes on the wire
are the same, in the same order; a partial send keeps its rest at the head of the queue
as pika does.

It replaces `_AsyncTransportBase._produce` of pika 1.x (what `_on_socket_writable`
calls for plain and TLS sockets alike) and checks first that the transport still has
the attributes it relies on; if a pika release changed them, pika's own is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from pika.adapters.utils import io_services_utils

log = logging.getLogger(__name__)

#: Most bytes joined into one send: larger bursts go in several (a partial send copies
#: the rest of its chunk, so a chunk is kept small enough for that to stay cheap).
JOIN_MAX_BYTES = 64 * 1024

_TRANSPORT = io_services_utils._AsyncTransportBase


def _produce_joined(self: Any) -> None:
    """Send the queued frames, joined into chunks of up to JOIN_MAX_BYTES."""
    buffers = self._tx_buffers
    while buffers:
        if len(buffers) > 1 and len(buffers[0]) < JOIN_MAX_BYTES:
            parts = [buffers.popleft()]
            size = len(parts[0])
            while buffers and size + len(buffers[0]) <= JOIN_MAX_BYTES:
                size += len(buffers[0])
                parts.append(buffers.popleft())
            buffers.appendleft(b"".join(parts))
        sent = self._sigint_safe_send(self._sock, buffers[0])
        chunk = buffers.popleft()
        if sent < len(chunk):
            buffers.appendleft(chunk[sent:])
        self._tx_buffered_byte_count -= sent


def join_queued_frames() -> bool:
    """Install the joined send (idempotent); False if this pika does not fit it."""
    if _TRANSPORT._produce is _produce_joined:
        return True
    fits = all(hasattr(_TRANSPORT, name) for name in ("_produce", "_sigint_safe_send", "_buffer_tx_data"))
    if not fits:
        log.debug("pika's transport changed: frames are sent one by one")
        return False
    _TRANSPORT._produce = _produce_joined
    return True
