"""A process's descendants and memory from Linux /proc, walked from the process down.

psutil's `children(recursive=True)` reads /proc/*/stat of every process on the host to
build a parent map: its cost grows with the host, not with the task. Here a process's
children come from /proc/PID/task/TID/children (the kernel's own list, one small read per
thread, CONFIG_PROC_CHILDREN, present in the common distribution kernels), so sampling a
task costs one read per process of that task. Where the kernel lacks those files, psutil
is the fallback (and `CHILDREN_LISTED` says so).
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import psutil

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
#: Bytes asked of each read(2) of a /proc file (they are a line or a few).
READ_CHUNK_BYTES = 4096
#: Whether this kernel lists children in /proc/PID/task/TID/children.
CHILDREN_LISTED = pathlib.Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (empty if it is gone)."""
    if not CHILDREN_LISTED:
        try:
            return [child.pid for child in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in threads:
        try:
            found += [int(child) for child in read_proc_file(f"/proc/{pid}/task/{tid}/children").split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


def read_proc_file(path: str) -> bytes:
    """The whole of a small /proc file in three system calls (open, read, close; more
    reads only for a long one). Python's `open()` adds fstat, ioctl and two lseeks, which
    doubled a pool child's system calls per task."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, READ_CHUNK_BYTES)
        if len(data) < READ_CHUNK_BYTES:
            return data
        chunks = [data]
        while chunk := os.read(fd, READ_CHUNK_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


#: waitid(2) option: wait for every kind of child, "clone" children too (linux/wait.h __WALL;
#: accepted by waitid since Linux 4.7).
WAIT_ALL_KINDS = 0x40000000


def has_children() -> bool:
    """Whether this process has a child, running or exited and not yet reaped: one waitid(2)
    that reaps nothing. A child started by any thread counts (it belongs to the thread
    group), so `False` means `descendants(os.getpid())` is empty without walking /proc."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT | WAIT_ALL_KINDS)
    except ChildProcessError:
        return False
    except OSError:  # a kernel older than 4.7 refuses __WALL here: walk to find out
        return True
    return True


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, walked from it down (not including `pid`)."""
    found: list[int] = []
    pending = children(pid)
    while pending:
        child = pending.pop()
        found.append(child)
        pending += children(child)
    return found


def _statm_bytes(pid: int, field: int) -> int:
    return _statm_field_bytes(lambda: read_proc_file(f"/proc/{pid}/statm"), field)


def _statm_field_bytes(read: Callable[[], bytes], field: int) -> int:
    """One field of a statm read by `read` (pages), in bytes; 0 if the process is gone."""
    try:
        return int(read().split()[field]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc/PID/statm (0 if it is gone)."""
    return _statm_bytes(pid, 1)


def vms_bytes(pid: int) -> int:
    """Virtual memory size of one process, from /proc/PID/statm (0 if it is gone)."""
    return _statm_bytes(pid, 0)


class OwnStatm:
    """This process's /proc/PID/statm, opened once: each reading is one pread(2), not an
    open, read and close. Open it in the process it describes (a forked copy would go on
    reading its parent's)."""

    def __init__(self) -> None:
        self._fd = os.open(f"/proc/{os.getpid()}/statm", os.O_RDONLY | os.O_CLOEXEC)

    def _read(self) -> bytes:
        return os.pread(self._fd, READ_CHUNK_BYTES, 0)

    def rss_bytes(self) -> int:
        """Resident set size of this process."""
        return _statm_field_bytes(self._read, 1)

    def vms_bytes(self) -> int:
        """Virtual memory size of this process."""
        return _statm_field_bytes(self._read, 0)


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (shared pages counted in each, as RSS does)."""
    return rss_bytes(pid) + sum(rss_bytes(child) for child in descendants(pid))
