"""The supervisor reads a child's replies in bulk (qm/worker/pipe_frames.py): whatever one
read brings, cut into the messages `Connection.send_bytes` framed, none lost or split."""
from __future__ import annotations

import multiprocessing
import multiprocessing.dummy
import os
import socket
import struct

from qm.worker.pipe_frames import READ_BYTES, ReplyFrames


def test_several_messages_in_one_read_come_out_whole_and_in_order():
    parent, child = multiprocessing.Pipe(duplex=True)
    for body in (b"one", b"", b"three" * 10):
        child.send_bytes(body)
    assert ReplyFrames(parent.fileno()).read() == [b"one", b"", b"three" * 10]


def test_a_message_longer_than_one_read_waits_until_it_is_whole():
    parent, child = multiprocessing.Pipe(duplex=True)
    big = os.urandom(3 * READ_BYTES + 7)
    frames = ReplyFrames(parent.fileno())
    got: list[bytes] = []
    sender = multiprocessing.dummy.Process(target=lambda: (child.send_bytes(big), child.send_bytes(b"after")))
    sender.start()
    reads = 0
    while len(got) < 2:
        more = frames.read()
        assert more is not None
        got += more
        reads += 1
    sender.join(10)
    assert got == [big, b"after"] and reads > 1


def test_the_long_length_form_and_end_of_file():
    left, right = socket.socketpair()
    body = b"x" * 10
    right.sendall(struct.pack("!i", -1) + struct.pack("!Q", len(body)) + body + struct.pack("!i", 2) + b"y")
    frames = ReplyFrames(left.fileno())
    assert frames.read() == [body]  # the second frame is not whole yet
    right.sendall(b"z")
    right.close()
    assert frames.read() == [b"yz"]
    assert frames.read() is None  # the child is gone
