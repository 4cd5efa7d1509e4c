"""A pool of long-lived child processes, one pipe each, driven from an asyncio loop.

    run(job) ──► idle slot ──pipe──► child process (own session) runs the handler
        ▲                                  │
        └── Outcome ◄── pipe reply ◄───────┘
                   ◄── sentinel readable (child died) → CRASHED, slot respawned

The loop waits on each child's pipe and process sentinel with `add_reader`; nothing
polls, and nothing on the loop waits for task work. Killing a running task is killing
its slot's process group (`Slot.kill`): the sentinel fires, the job's future resolves
with the state the killer chose, and a fresh child takes the slot. The pool knows
nothing of AMQP or gRPC.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from typing import Callable, Sequence

from qm.states import TaskState
from qm.worker.child import child_main

log = logging.getLogger(__name__)

#: How long stop() waits for idle children to exit after their pipe closes.
CHILD_EXIT_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Job:
    task_id: str
    type: str
    payload: bytes


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: TaskState
    result: bytes = b""
    error: str = ""


@dataclasses.dataclass(eq=False)
class Slot:
    """One child process and what it is doing."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    alive: bool = True
    job: Job | None = None
    future: asyncio.Future | None = None
    started_at_s: float = 0.0
    kill_outcome: Outcome | None = None

    def kill(self, outcome: Outcome) -> None:
        """Kill the running task's whole process group; its job ends with `outcome`."""
        if self.alive and self.job is not None:
            self.kill_outcome = outcome
            _kill_group(self.process.pid)


class Pool:
    """`procs` children; `await run(job)` runs one job on the next idle child."""

    def __init__(self, procs: int, start_method: str = "forkserver",
                 preload_modules: Sequence[str] = ()) -> None:
        self.procs = procs
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(["qm.worker.child", *preload_modules])
        self.slots: list[Slot] = []
        self._idle: asyncio.Queue[Slot] = asyncio.Queue()
        self._closing = False
        self.restarts = 0

    async def start(self) -> None:
        self.slots = [self._spawn(index) for index in range(self.procs)]

    def _spawn(self, index: int) -> Slot:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(target=child_main, args=(child_conn,),
                                        name=f"qm-child-{index}", daemon=True)
        process.start()
        child_conn.close()
        slot = Slot(index, process, parent_conn)
        loop = asyncio.get_running_loop()
        loop.add_reader(parent_conn.fileno(), self._on_reply, slot)
        loop.add_reader(process.sentinel, self._on_exit, slot)
        self._idle.put_nowait(slot)
        return slot

    async def run(self, job: Job, on_started: Callable[[], None] | None = None) -> Outcome:
        """Run a job on a child; `on_started` is called once a child has it.

        Cancelled while waiting for a child: the job never ran. Cancelled while running:
        the child finishes it and its outcome is dropped.
        """
        slot = await self._idle.get()
        while not slot.alive:
            slot = await self._idle.get()
        slot.job, slot.started_at_s, slot.kill_outcome = job, time.time(), None
        slot.future = asyncio.get_running_loop().create_future()
        try:
            slot.conn.send(("run", job.task_id, job.type, job.payload))
        except OSError:
            pass  # the child just died: its sentinel resolves the future as CRASHED
        if on_started is not None:
            on_started()
        return await slot.future

    def _finish(self, slot: Slot, outcome: Outcome) -> None:
        future, slot.future, slot.job = slot.future, None, None
        if future is not None and not future.done():
            future.set_result(outcome)

    def _on_reply(self, slot: Slot) -> None:
        try:
            kind, value = slot.conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())
            return  # the child is gone; _on_exit reports it
        outcome = Outcome(TaskState.SUCCEEDED, result=value) if kind == "ok" else \
            Outcome(TaskState.FAILED, error=value)
        self._finish(slot, outcome)
        if slot.kill_outcome is None:  # a killed child is dying: _on_exit replaces the slot
            self._idle.put_nowait(slot)

    def _on_exit(self, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(slot.process.sentinel)
        loop.remove_reader(slot.conn.fileno())
        slot.alive = False
        slot.process.join()
        slot.conn.close()
        if slot.job is not None:
            outcome = slot.kill_outcome or Outcome(TaskState.CRASHED, error=describe_exit(
                slot.process.exitcode, slot.job))
            log.warning("task %s: child %d (pid %d) ended: %s", slot.job.task_id, slot.index,
                        slot.process.pid, outcome.error)
            self._finish(slot, outcome)
        if not self._closing:
            self.restarts += 1
            self.slots[slot.index] = self._spawn(slot.index)

    async def stop(self) -> None:
        """Close every pipe (idle children exit) and kill what is still running."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            if slot.alive:
                loop.remove_reader(slot.conn.fileno())
                loop.remove_reader(slot.process.sentinel)
                if slot.job is not None:
                    _kill_group(slot.process.pid)
                slot.conn.close()
        await asyncio.to_thread(self._join_all)

    def _join_all(self) -> None:
        deadline = time.monotonic() + CHILD_EXIT_TIMEOUT_S
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.exitcode is None:
                _kill_group(slot.process.pid)
                slot.process.join()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        # No such group yet: the child has not reached os.setsid() (it is still starting),
        # so it has spawned nothing either; killing the process itself is enough.
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


#: Likely causes of a child's death by signal, for the error a user reads.
_SIGNAL_CAUSES = {
    signal.SIGSEGV: "segmentation fault: a crash in native code the task called",
    signal.SIGKILL: "killed with SIGKILL: the kernel's OOM killer or an operator?",
    signal.SIGABRT: "aborted: a failed assertion in native code?",
    signal.SIGBUS: "bus error: a crash in native code the task called",
    signal.SIGFPE: "floating point exception in native code",
    signal.SIGTERM: "terminated with SIGTERM from outside the worker",
}


def describe_exit(exitcode: int | None, job: Job) -> str:
    """Why a child died while running a job, with the likely cause."""
    prefix = f"the child process running task {job.task_id} ({job.type})"
    if exitcode is not None and exitcode < 0:
        signum = -exitcode
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        cause = _SIGNAL_CAUSES.get(signum, "killed by a signal")
        return f"{prefix} died from signal {name} ({cause})"
    return (f"{prefix} exited with code {exitcode} while the task ran "
            "(the task called os._exit() or sys.exit(), or the interpreter aborted)")
