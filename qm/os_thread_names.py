"""The calling thread's name as the kernel shows it (`top -H`, `ps -L`, py-spy,
/proc/PID/task/TID/comm), so an operator can tell a process's threads apart and see
which one uses the CPU. Python sets it only from 3.14 on; before, every thread shows the
process's name. Linux only (prctl PR_SET_NAME); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading

_PR_SET_NAME = 15
_MAX_BYTES = 15  # the kernel's TASK_COMM_LEN, less the NUL


@functools.cache
def _prctl():
    """libc's prctl, from the symbols already loaded in this process (dlopen(NULL)): no
    `ctypes.util.find_library`, which runs `ldconfig -p` in a subprocess."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_this_thread(name: str | None = None) -> None:
    """Give the calling thread `name` (default: its Python name), cut to 15 bytes."""
    prctl = _prctl()
    if prctl is None:
        return
    encoded = (name or threading.current_thread().name).encode("utf-8", "replace")[:_MAX_BYTES]
    prctl(_PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0)
