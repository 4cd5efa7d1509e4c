"""Frames queued in pika's transport go out joined, byte for byte in order, through
partial sends too, at the end of the loop turn that queued them (qm/broker/pika_writes.py)."""

import asyncio
import collections
import selectors
import socket

from pika.adapters.utils import io_services_utils

from qm.broker import pika_writes


class _Queued:
    """What _produce reads of a pika transport: its queue, byte count, socket, send."""

    def __init__(self, sock: socket.socket, frames: list[bytes]) -> None:
        self._sock = sock
        self._tx_buffers = collections.deque(frames)
        self._tx_buffered_byte_count = sum(map(len, frames))
        self.sends = 0

    def _sigint_safe_send(self, sock: socket.socket, data: bytes) -> int:
        self.sends += 1
        return sock.send(data)


def _drain(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(sock.recv(1 << 20))
        except BlockingIOError:
            return b"".join(chunks)


def test_small_frames_go_out_in_one_send_in_order():
    left, right = socket.socketpair()
    with left, right:
        right.setblocking(False)
        frames = [b"method-%d|" % n for n in range(30)]
        queued = _Queued(left, frames)
        pika_writes._produce_joined(queued)
        assert _drain(right) == b"".join(frames)
        assert queued.sends == 1 and queued._tx_buffered_byte_count == 0 and not queued._tx_buffers


def test_a_burst_past_the_socket_buffer_keeps_its_rest_queued_in_order():
    left, right = socket.socketpair()
    with left, right:
        left.setblocking(False)
        right.setblocking(False)
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        frames = [bytes([n % 251]) * 1000 for n in range(2000)]  # 2 MB: more than the buffers hold
        queued = _Queued(left, frames)
        received = []
        while queued._tx_buffers:
            try:
                pika_writes._produce_joined(queued)
            except BlockingIOError:  # pika waits for writability here; the test reads instead
                pass
            received.append(_drain(right))
            assert queued._tx_buffered_byte_count == sum(map(len, queued._tx_buffers))
        assert b"".join(received) == b"".join(frames)
        assert max(len(chunk) for chunk in received) > 0


def test_the_join_is_installed_once_on_pikas_transport():
    assert pika_writes.join_queued_frames() and pika_writes.join_queued_frames()
    assert io_services_utils._AsyncTransportBase._produce is pika_writes._produce_joined


# -- the end-of-turn flush, on pika's real plain transport and asyncio adapter -------------

class _Protocol:
    """The stream protocol pika's transport feeds; here it only keeps what it was told."""

    def __init__(self) -> None:
        self.lost: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def connection_lost(self, error: BaseException | None) -> None:
        self.lost.append(error)


def _transport(loop: asyncio.AbstractEventLoop, sock: socket.socket):
    from pika.adapters.asyncio_connection import _AsyncioIOServicesAdapter

    assert pika_writes.join_queued_frames() and pika_writes.flush_at_end_of_turn()
    sock.setblocking(False)
    return io_services_utils._AsyncPlaintextTransport(sock, _Protocol(), _AsyncioIOServicesAdapter(loop))


def _watching_writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    key = loop._selector.get_map().get(sock.fileno())  # type: ignore[attr-defined]
    return key is not None and bool(key.events & selectors.EVENT_WRITE)


def test_a_turns_frames_go_out_in_one_send_at_its_end_without_a_writability_watcher():
    async def body() -> tuple[bytes, int, bool, bool]:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        with left, right:
            right.setblocking(False)
            transport = _transport(loop, left)
            sends = []
            real_send = transport._sigint_safe_send
            transport._sigint_safe_send = lambda sock, data: sends.append(data) or real_send(sock, data)
            for n in range(30):  # one turn's frames: nothing is sent before the turn ends
                transport.write(b"frame-%d|" % n)
            before_turn_end = _drain(right)
            watching = _watching_writable(loop, left)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return before_turn_end + _drain(right), len(sends), watching, _watching_writable(loop, left)

    received, sends, watching, watching_after = asyncio.run(body())
    assert received == b"".join(b"frame-%d|" % n for n in range(30))
    assert sends == 1 and not watching and not watching_after


def test_a_burst_the_socket_cannot_take_arrives_whole_through_pikas_watcher():
    async def body() -> tuple[bytes, bytes, list]:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        with left, right:
            left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            right.setblocking(False)
            transport = _transport(loop, left)
            frames = [bytes([n % 251]) * 1000 for n in range(3000)]  # 3 MB: far past the buffers
            for frame in frames:
                transport.write(frame)
            received = []
            deadline = loop.time() + 30.0
            while transport.get_write_buffer_size() and loop.time() < deadline:
                await asyncio.sleep(0.001)
                received.append(_drain(right))
            received.append(_drain(right))
            return b"".join(received), b"".join(frames), transport._protocol.lost

    received, sent, lost = asyncio.run(body())
    assert received == sent and lost == []


def test_a_send_that_fails_aborts_the_connection_as_pika_would():
    async def body() -> list:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        with left:
            transport = _transport(loop, left)
            protocol = transport._protocol  # pika lets go of it once the connection is lost
            right.close()  # the broker's end is gone
            transport.write(b"frame")
            for _ in range(5):
                await asyncio.sleep(0)
            return protocol.lost

    lost = asyncio.run(body())
    assert len(lost) == 1 and isinstance(lost[0], OSError)


def test_the_flush_is_installed_once_on_pikas_plain_transport_only():
    assert pika_writes.flush_at_end_of_turn() and pika_writes.flush_at_end_of_turn()
    assert io_services_utils._AsyncPlaintextTransport.write is pika_writes._write_then_flush_soon
    assert io_services_utils._AsyncSSLTransport.write is not pika_writes._write_then_flush_soon


def test_a_blocking_connection_keeps_pikas_write():
    """pika's BlockingConnection (its own I/O loop, no call_soon) in the same process."""
    from pika.adapters.select_connection import IOLoop
    from pika.adapters.utils.selector_ioloop_adapter import SelectorIOServicesAdapter

    assert pika_writes.flush_at_end_of_turn()
    ioloop = IOLoop()
    left, right = socket.socketpair()
    with left, right:
        left.setblocking(False)
        right.setblocking(False)
        transport = io_services_utils._AsyncPlaintextTransport(left, _Protocol(), SelectorIOServicesAdapter(ioloop))
        transport.write(b"frame")  # pika's own: a writability watcher on its loop
        ioloop.call_later(0.2, ioloop.stop)
        ioloop.start()
        assert _drain(right) == b"frame"
    ioloop.close()
