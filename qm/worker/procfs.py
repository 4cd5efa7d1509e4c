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

import psutil

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
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
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as listing:
                found += [int(child) for child in listing.read().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


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
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[field]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc/PID/statm (0 if it is gone)."""
    return _statm_bytes(pid, 1)


def vms_bytes(pid: int) -> int:
    """Virtual memory size of one process, from /proc/PID/statm (0 if it is gone)."""
    return _statm_bytes(pid, 0)


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (shared pages counted in each, as RSS does)."""
    return rss_bytes(pid) + sum(rss_bytes(child) for child in descendants(pid))
