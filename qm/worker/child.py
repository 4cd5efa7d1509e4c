"""The child side of a pool slot: receive a job on the pipe, run it, send the outcome.

Children only run task code: no network, no broker. Each starts its own session
(process group) so the supervisor can kill a task together with anything it spawned.
Messages on the pipe (pickled tuples):
    supervisor → child: ("run", task_id, type, payload_bytes)
    child → supervisor: ("ok", result_bytes) | ("error", text)
"""
from __future__ import annotations

import ctypes
import os
import signal
import traceback
from multiprocessing.connection import Connection

from qm.errors import QMError
from qm.registry import Registry, discover

#: prctl option: signal to receive when the parent process dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: Traceback lines of a failed task kept in its error (the last ones: where it failed).
ERROR_TRACEBACK_LINES = 6


def child_main(conn: Connection) -> None:
    """Entry point of a pool child; returns when the supervisor closes the pipe."""
    os.setsid()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when children stop
    registry = discover()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        _kind, task_id, task_type, payload = message
        conn.send(run_job(registry, task_type, payload))


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when its parent dies (the forkserver, which itself exits
    with the supervisor), so a kill -9 of the supervisor leaves no task running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned child still exits when its pipe closes


def run_job(registry: Registry, task_type: str, payload: bytes) -> tuple:
    """Run one job in this process; any exception becomes an ("error", text) reply."""
    try:
        declared = registry.get(task_type)
    except QMError:
        return ("error", f"task type {task_type!r} is not installed on this worker "
                         f"(it serves: {', '.join(sorted(registry.types)) or 'none'})")
    try:
        value = declared.handler(declared.decode_payload(payload))
        return ("ok", declared.encode_result(value))
    except Exception as exc:  # task code may raise anything; it must not kill the child
        return ("error", _describe(exc))


def _describe(exc: BaseException) -> str:
    summary = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, QMError):
        return summary
    frames = traceback.format_exception(exc)
    tail = "".join(frames[-ERROR_TRACEBACK_LINES:-1]).rstrip()
    return f"{summary}\n{tail}" if tail else summary
