"""How the other systems' runs in load/bench_side_by_side.py say they ended: one datagram
"TAG RESULT" each, on a local socket the benchmark listens on ($QM_BENCH_DONE_SOCKET).

Dramatiq and Celery have no result stream without a result backend; a datagram costs a run
a few microseconds and is the fastest report it could make.
"""
from __future__ import annotations

import os
import pathlib
import socket
import threading
import time

_local = threading.local()


def report(tag: int, result: str) -> None:
    """In a run: tell the benchmark that run `tag` ended with `result`."""
    sock = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.sendto(f"{tag} {result}".encode(), os.environ["QM_BENCH_DONE_SOCKET"])
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # a message left from an earlier run: nobody waits for it


class DoneSocket:
    """In the benchmark: the datagrams runs send as they end, tag -> (perf_counter, result)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._arrived: list[tuple[int, float, str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="bench-done", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return  # closed
            at = time.perf_counter()
            tag, _, result = data.decode().partition(" ")
            with self._changed:
                self._arrived.append((int(tag), at, result))
                self._changed.notify_all()

    def wait(self, tags: list[int], bound_s: float) -> dict[int, tuple[float, str]]:
        """When each of `tags` arrived and its result; TimeoutError past `bound_s`."""
        missing, seen = set(tags), {}
        deadline = time.monotonic() + bound_s
        with self._changed:
            while missing:
                others = []  # arrived for another wait: kept for it
                for tag, at, result in self._arrived:
                    if tag in missing:
                        missing.discard(tag)
                        seen[tag] = (at, result)
                    else:
                        others.append((tag, at, result))
                self._arrived = others
                left = deadline - time.monotonic()
                if missing and left <= 0:
                    raise TimeoutError(f"{len(missing)} of {len(tags)} runs not done in {bound_s:g} s")
                if missing:
                    self._changed.wait(left)
        return {tag: seen[tag] for tag in tags}

    def close(self) -> None:
        self._sock.close()
