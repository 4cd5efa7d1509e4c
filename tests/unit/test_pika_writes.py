"""Frames queued in pika's transport go out joined, byte for byte in order, through
partial sends too (qm/broker/pika_writes.py)."""

import collections
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
