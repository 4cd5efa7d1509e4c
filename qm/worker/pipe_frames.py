"""Replies off a child's pipe, several per read: multiprocessing's framing, read in bulk.

`Connection.recv_bytes` makes two reads per message (its 4-byte length, then the body).
The supervisor reads whatever the socket holds (up to 64 KiB) in one read and cuts out
the whole frames; a partial one waits in the buffer for the next read. The child still
writes with `Connection.send_bytes`: a big-endian signed 32-bit length, or -1 and a 64-bit
length for 2 GiB and more.
"""

from __future__ import annotations

import os
import struct

READ_BYTES = 64 * 1024
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


class ReplyFrames:
    """The frames a child wrote on its pipe, in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> list[bytearray] | None:
        """One read (the pipe must be readable); the whole frames it completed, or None at
        end of file (the child is gone). OSError as from os.read."""
        chunk = os.read(self.fd, READ_BYTES)
        if not chunk:
            return None
        self._buffer += chunk
        return self._frames()

    def _frames(self) -> list[bytearray]:
        frames: list[bytearray] = []
        buffer = self._buffer
        at = 0
        while len(buffer) - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, at)
            start = at + _LENGTH.size
            if size == -1:
                if len(buffer) - start < _LONG_LENGTH.size:
                    break
                (size,) = _LONG_LENGTH.unpack_from(buffer, start)
                start += _LONG_LENGTH.size
            if len(buffer) - start < size:
                break
            frames.append(buffer[start : start + size])  # one copy (marshal reads a bytearray)
            at = start + size
        del buffer[:at]
        return frames
