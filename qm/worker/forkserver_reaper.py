"""Imported only by the worker's forkserver (as a preload module): when the supervisor
that started the forkserver dies, kill every pool child's process group, then exit.

    supervisor ──(dies: kill -9, OOM, crash)──► lifeline EOF in each child → killpg(self)
         │                                      (the normal path, qm/worker/child.py)
         └── forkserver: this thread sees the death on a pidfd, waits CHILDREN_FIRST_S,
             SIGKILLs each remaining child's group (a child stuck in native code with the
             GIL held cannot run its lifeline thread), then exits; children's
             PR_SET_PDEATHSIG fires on whatever is left.

Importing this module starts the watching thread and makes the forkserver ignore stop
signals; that is its only purpose, and only Pool lists it in the forkserver's preload.
Its cost: one thread blocked in poll(2).
"""

from __future__ import annotations

import os
import pathlib
import select
import signal
import threading
import time

#: Time the children get to kill their own groups (lifeline EOF) before the forkserver does.
CHILDREN_FIRST_S = 0.5
#: Poll interval where pidfds are missing (Linux < 5.3): how often the parent is checked.
PARENT_POLL_S = 0.2


def _wait_for_death(pid: int) -> None:
    """Return once process `pid` (our parent) has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while os.getppid() == pid:
            time.sleep(PARENT_POLL_S)
        return
    select.select([pidfd], [], [])
    os.close(pidfd)


def _own_children() -> list[int]:
    """Pids of this process's children, from /proc/self/task/*/children (no host scan)."""
    pids: list[int] = []
    for listing in pathlib.Path("/proc/self/task").glob("*/children"):
        try:
            pids += [int(pid) for pid in listing.read_text().split()]
        except OSError:
            continue
    return pids


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # a pool child leads its own session
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)  # not yet a group leader: still starting
        except ProcessLookupError:
            pass


def _reap_when_supervisor_dies(supervisor_pid: int) -> None:
    _wait_for_death(supervisor_pid)
    time.sleep(CHILDREN_FIRST_S)
    for pid in _own_children():
        _kill_group(pid)
    os._exit(0)


def _start() -> None:
    # Only the supervisor decides when the worker stops: a stop signal sent to the whole
    # process group (systemd, supervisord, Ctrl-C) must not take the forkserver, and with
    # it the children (parent-death signal), down while the supervisor drains.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor_pid = os.getppid()
    if supervisor_pid == 1:  # the supervisor died before the forkserver got here
        os._exit(0)
    threading.Thread(
        target=_reap_when_supervisor_dies, args=(supervisor_pid,), name="qm-forkserver-reaper", daemon=True
    ).start()


_start()
