"""The child side of a pool slot: receive a job on the pipe, run it, send the outcome.

Children only run task code: no network, no broker. Each starts its own session
(process group) so the supervisor can kill a task together with anything it spawned,
and only then says it is ready: no task reaches a child that a terminal's Ctrl-C could
still hit. What travels on the pipe: qm/worker/jobs.py.

Limits inside the child are the second layer; the supervisor enforces the real ones
(hard deadline, RSS) by killing the process group.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

from qm import cpu_allowance, task_progress
from qm.errors import PermanentError, QMError, Retry, SoftTimeout
from qm.registry import Registry, discover
from qm.worker import procfs
from qm.worker import sched_policy as worker_sched_policy
from qm.worker.jobs import Reply, ReplyKind, decode_job, encode_reply
from qm.worker.progress import ChildReporter

#: prctl option: signal to receive when the parent process dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: Traceback lines of a failed task kept in its error (the last ones: where it failed).
ERROR_TRACEBACK_LINES = 6
#: Address-space allowance per MiB of memory limit (virtual memory runs ahead of RSS).
ADDRESS_SPACE_FACTOR = 2
MIB = 1024 * 1024


def child_main(
    conn: Connection,
    lifeline: Connection,
    address_space_limit: bool = True,
    die_with_parent: bool = True,
    executor_keys: tuple = (None, 0.0),
    report_idle_rss: bool = False,
    sched_policy: int | None = None,
) -> None:
    """Entry point of a pool child; returns when the supervisor closes the pipe.

    `lifeline` is the read end of a pipe whose write end only the supervisor holds: EOF
    on it means the supervisor is gone, and the child kills its whole process group.
    `die_with_parent` adds the kernel's parent-death signal (forkserver start method,
    where the parent is the forkserver, which outlives the children by design).
    `executor_keys`: the `python` task type's (Keyring, signature ttl), if enabled.
    `report_idle_rss`: each reply carries this process's RSS after the task (one /proc
    read), for idle-RSS recycling, which cannot read it later if a next task is queued.
    `sched_policy`: the CPU scheduling policy the worker was started with, for the tasks
    (the supervisor's own, inherited, is SCHED_BATCH: qm/worker/sched_policy.py)."""
    os.setsid()
    own_statm = procfs.OwnStatm()
    worker_sched_policy.take_back(sched_policy)
    _watch_lifeline(lifeline)
    if die_with_parent:
        _die_with_parent()
    # The supervisor decides when children stop: a Ctrl-C or a service manager's SIGTERM
    # to everything must not kill running tasks while the supervisor drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    registry = discover()
    if executor_keys[0] is not None:  # the `python` type's keys, from the supervisor (not the environment)
        from qm.tasks import python as python_task

        python_task.configure(*executor_keys)
    try:
        conn.send_bytes(encode_reply(Reply(ReplyKind.READY, os.getpid())))
    except (BrokenPipeError, OSError):
        return  # the pool stopped while this child was starting
    send_lock = threading.Lock()  # qm.progress()'s thread writes on the pipe too
    reporter = ChildReporter(conn, send_lock)
    task_progress.install(reporter)
    every_core = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        received_at_s = time.monotonic()
        job = decode_job(data)
        limit_bytes = job.memory_limit_mb * MIB if address_space_limit else 0
        cpu_allowance.allow(job.cpus, job.cores, every_core)  # its CPUs: qm.task_cpus(), the affinity
        reporter.begin(job.task_id)
        try:
            reply = run_limited(registry, job.type, job.payload, job.soft_timeout_s, limit_bytes, own_statm)
        except SoftTimeout as exc:  # the alarm fired between the task's end and disarming
            reply = Reply(ReplyKind.SOFT_TIMEOUT, f"SoftTimeout: {exc}")
        reporter.end()
        _kill_leftover_descendants()
        idle_rss_bytes = own_statm.rss_bytes() if report_idle_rss else 0
        with send_lock:
            conn.send_bytes(encode_reply(reply, received_at_s, time.monotonic(), idle_rss_bytes))


def _watch_lifeline(lifeline: Connection) -> None:
    """A thread that waits for EOF on the lifeline (the supervisor died, however it died)
    and then SIGKILLs this child's process group: the task and everything it started.
    It blocks in read(2) without the GIL, so a task spinning in Python does not delay it
    past one switch interval."""

    def wait_then_kill() -> None:
        try:
            while True:
                lifeline.recv_bytes()
        except (EOFError, OSError):
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=wait_then_kill, name="qm-lifeline", daemon=True).start()


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when its parent (the forkserver) dies. The forkserver
    outlives the children on purpose (qm/worker/forkserver_reaper.py kills their groups
    first), so this is the last resort for a child whose lifeline thread could not run:
    a task holding the GIL in native code."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned child still exits when its pipe closes


def _kill_leftover_descendants() -> None:
    """A finished task leaves nothing running: its subprocesses die with it (found from this
    process down, qm/worker/procfs.py). Usually there are none, which one waitid(2) tells
    without walking /proc."""
    if not procfs.has_children():
        return
    for pid in procfs.descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def _raise_soft_timeout(signum, frame) -> None:
    raise SoftTimeout("the task reached its soft timeout; the hard kill comes at its time limit")


def run_limited(
    registry: Registry,
    task_type: str,
    payload: bytes,
    soft_timeout_s: float,
    memory_limit_bytes: int,
    own_statm: procfs.OwnStatm | None = None,
) -> Reply:
    """Run one job under the soft timeout and address-space cap, then lift both.
    `own_statm`: this process's statm kept open (a pool child's); without it, it is read
    by path."""
    previous_as = resource.getrlimit(resource.RLIMIT_AS)
    if memory_limit_bytes:
        vms = own_statm.vms_bytes() if own_statm is not None else procfs.vms_bytes(os.getpid())
        cap = vms + ADDRESS_SPACE_FACTOR * memory_limit_bytes
        if previous_as[1] == resource.RLIM_INFINITY or cap < previous_as[1]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, previous_as[1]))
    if soft_timeout_s > 0:
        signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
    try:
        return run_job(registry, task_type, payload)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # also one the task armed itself
        resource.setrlimit(resource.RLIMIT_AS, previous_as)


def run_job(registry: Registry, task_type: str, payload: bytes) -> Reply:
    """Run one job in this process; any exception becomes an error reply."""
    try:
        declared = registry.get(task_type)
    except QMError:
        return Reply(
            ReplyKind.ERROR,
            f"task type {task_type!r} is not installed on this worker "
            f"(it serves: {', '.join(sorted(registry.types)) or 'none'})",
        )
    try:
        value = declared.handler(declared.decode_payload(payload))
        return Reply(ReplyKind.OK, declared.encode_result(value))
    except SoftTimeout as exc:
        return Reply(ReplyKind.SOFT_TIMEOUT, f"SoftTimeout: {exc}")
    except Retry as exc:
        return Reply(ReplyKind.RETRY, f"Retry: {exc}", exc.delay_s)
    except PermanentError as exc:
        return Reply(ReplyKind.PERMANENT, _describe(exc))
    except MemoryError:
        return Reply(
            ReplyKind.MEMORY,
            "MemoryError: the task tried to allocate beyond its memory limit "
            "(address-space cap, worker.address_space_limit)",
        )
    except Exception as exc:  # task code may raise anything; it must not kill the child
        return Reply(ReplyKind.ERROR, _describe(exc))


def _describe(exc: BaseException) -> str:
    summary = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, QMError):
        return summary
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__ and exc.__traceback__.tb_next)
    tail = "".join(frames[-ERROR_TRACEBACK_LINES:-1]).rstrip()
    return f"{summary}\n{tail}" if tail else summary
