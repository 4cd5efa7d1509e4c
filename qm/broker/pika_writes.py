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

`flush_at_end_of_turn()`: on a plain socket, pika's `write` turned a writability watcher
on for each burst (`add_writer`: an epoll_ctl), sent from the next poll's callback, then
turned it off again (another epoll_ctl): 4 to 5 % of a worker supervisor's Python time
under load. The replacement sends what the turn queued from a callback scheduled with
`call_soon` instead, and turns the watcher on only when the socket would block (the rest
then goes as pika sends it). TLS transports, and transports on pika's own I/O loops
(BlockingConnection: the test tooling's), keep pika's `write`.
"""

from __future__ import annotations

import logging
from typing import Any

import pika.compat
from pika.adapters.asyncio_connection import _AsyncioIOServicesAdapter
from pika.adapters.utils import io_services_utils

log = logging.getLogger(__name__)

#: Most bytes joined into one send: larger bursts go in several (a partial send copies
#: the rest of its chunk, so a chunk is kept small enough for that to stay cheap).
JOIN_MAX_BYTES = 64 * 1024

_TRANSPORT = io_services_utils._AsyncTransportBase
_PLAIN = io_services_utils._AsyncPlaintextTransport
_PIKA_WRITE = _PLAIN.write  # kept for transports on pika's other I/O loops (BlockingConnection's)
#: What the end-of-turn flush uses of pika's plain transport (its class attributes).
_PLAIN_NEEDS = (
    "_STATE_ACTIVE",
    "_buffer_tx_data",
    "get_write_buffer_size",
    "_produce",
    "_initiate_abort",
    "_on_socket_writable",
)
_AGAIN: tuple[int, ...] = getattr(io_services_utils, "_TRY_IO_AGAIN_SOCK_ERROR_CODES", ())


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


def _write_then_flush_soon(self: Any, data: bytes) -> None:
    """pika's plain-socket `write`, except that on an asyncio loop the first frame of a
    burst schedules one flush at the end of this loop turn instead of a writability
    watcher. Transports on pika's own I/O loops (BlockingConnection) keep pika's write."""
    if not isinstance(self._nbio, _AsyncioIOServicesAdapter):
        _PIKA_WRITE(self, data)
        return
    if self._state != self._STATE_ACTIVE:
        return  # pika ignores a write while the transport is not active
    was_empty = self.get_write_buffer_size() == 0
    self._buffer_tx_data(data)
    if was_empty:  # else a flush is scheduled, or the watcher is on (the socket was full)
        self._nbio.get_native_ioloop().call_soon(_flush, self)


def _flush(self: Any) -> None:
    """Send what is queued; if the socket would block, let pika's watcher send the rest."""
    if self._state != self._STATE_ACTIVE or not self._tx_buffers:
        return
    try:
        self._produce()
    except (Exception, pika.compat.SOCKET_ERROR) as error:
        again = isinstance(error, pika.compat.SOCKET_ERROR) and error.errno in _AGAIN
        if not again:
            log.debug("sending to the broker failed, aborting the connection: %r", error)
            self._initiate_abort(error)
            return
    if self._tx_buffers:  # the socket is full: wait until it is writable, as pika does
        self._nbio.set_writer(self._sock.fileno(), self._on_socket_writable)


def flush_at_end_of_turn() -> bool:
    """Install the end-of-turn flush on pika's plain transport (idempotent); False if this
    pika does not fit it."""
    if _PLAIN.write is _write_then_flush_soon:
        return True
    if not _AGAIN or not all(hasattr(_PLAIN, name) for name in _PLAIN_NEEDS):
        log.debug("pika's plain transport changed: bursts go out when its writability watcher fires")
        return False
    _PLAIN.write = _write_then_flush_soon
    return True
