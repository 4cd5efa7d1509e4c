"""A pool of long-lived child processes, one pipe each, driven from an asyncio loop.

    run(job) ──► idle slot ──pipe──► child process (own session) runs the handler
        ▲            │                     │
        │            ├─ deadline timer ────┼──► kill process group → TIMED_OUT
        │            └─ RSS sampler ───────┼──► kill process group → MEMORY_EXCEEDED
        ├── on_progress ◄── PROGRESS replies ◄─┤ (qm.progress() in the task, any number)
        └── Outcome ◄── pipe reply ◄───────┘
                   ◄── sentinel readable (child died) → CRASHED (or the killer's outcome),
                                                        slot respawned

The loop waits on each child's pipe and process sentinel with `add_reader`; nothing
waits for task work. A child joins the idle set only after it says "ready" (it has its
own session by then). A job waiting for a child (the highest priority first:
qm/worker/ready.py) is sent to the next child that replies in the callback that reads the
reply: no loop iteration between one task's end and the next one's start. That gap,
from the child's own timestamps, is reported to `on_idle_gap` for every job that was
waiting when the previous task ended. After a task, a child past
`max_tasks_per_child` or with an idle RSS over `max_idle_rss_mb` is retired and replaced.
The pool knows nothing of AMQP/gRPC.

CPU slots (qm/worker/cpu_slots.py): a job with `cpus` N starts only when N of the `procs`
slots are free, and holds them until it ends. Jobs start in the order of the waiting line
(highest priority first, then arrival: qm/worker/ready.py): while the first waiting job
does not fit, none behind it starts (nor is pipelined), so a big job is never starved by
a stream of small ones of its priority or below; the cost is slots left idle while it
waits for enough to free. A job of higher priority that comes meanwhile goes ahead of it.
Only single-CPU jobs are pipelined, and only behind single-CPU jobs (a pipelined job takes
over the slot of the one before it).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from typing import Callable, Sequence, cast

from qm.states import TaskState
from qm.task_progress import Progress
from qm.worker import procfs
from qm.worker.child import MIB, child_main
from qm.worker.cpu_slots import CpuSlots
from qm.worker.jobs import Job, Reply, ReplyKind, decode_reply, encode_job
from qm.worker.pipe_frames import ReplyFrames
from qm.worker.ready import ReadyJobs

__all__ = ["Job", "Outcome", "Pool", "Slot", "describe_exit"]

log = logging.getLogger(__name__)

#: How long stop() waits for idle children to exit after their pipe closes.
CHILD_EXIT_TIMEOUT_S = 5.0
#: Pause before restarting a child that died before it was ready.
STARTUP_FAILURE_DELAY_S = 1.0


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: TaskState
    result: bytes = b""
    error: str = ""
    retry_requested: bool = False  # the task raised qm.Retry
    retry_delay_s: float | None = None  # ... with this delay
    permanent: bool = False  # the task raised qm.PermanentError: never retry
    #: By the child's clock, from taking the job off its pipe to replying (None: it never
    #: replied, e.g. killed). Not part of what the task did: outcomes compare without it.
    run_s: float | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(eq=False)
class Slot:
    """One child process and what it is doing."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    alive: bool = True
    ready: bool = False
    retired: bool = False
    job: Job | None = None
    future: asyncio.Future | None = None
    started_at_s: float = 0.0
    kill_outcome: Outcome | None = None
    deadline: asyncio.TimerHandle | None = None
    tasks_done: int = 0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    on_progress: Callable[[Progress], None] | None = None
    gap_from_s: float | None = None  # end of its last task (monotonic) if its job was waiting then
    queued: _Waiting | None = None  # sent behind the running job; the child starts it next
    recycle_reason: str = ""  # to be recycled once the job queued in it is done

    def __post_init__(self) -> None:
        self.frames = ReplyFrames(self.conn.fileno())  # its replies, read in bulk

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None  # the process is started (Pool._spawn) before its slot exists
        return pid

    def kill(self, outcome: Outcome | None) -> None:
        """Kill the running task's whole process group; its job ends with `outcome`."""
        if self.alive and self.job is not None and self.kill_outcome is None:
            self.kill_outcome = outcome or Outcome(TaskState.CANCELLED, error="cancelled")
            _kill_group(self.pid)

    def sample_rss(self) -> int:
        """RSS of the child and all its descendants, in bytes (0 if it is gone): one /proc
        read per process of this child, never a scan of the host (qm/worker/procfs.py)."""
        total = procfs.tree_rss_bytes(self.pid)
        self.rss_bytes = total
        self.peak_rss_bytes = max(self.peak_rss_bytes, total)
        return total


@dataclasses.dataclass(eq=False)
class _Waiting:
    """A job not started yet; `slot` resolves when a child starts it."""

    job: Job
    on_started: Callable[[], None] | None
    on_sent: Callable[[], None] | None
    slot: asyncio.Future[Slot]
    cancel_outcome: Outcome | None = None  # cancelled while queued in a child: killed as it starts
    on_progress: Callable[[Progress], None] | None = None  # the task's qm.progress() updates
    prefer: tuple[int, ...] = ()  # pipelined: the CPU slots of the job it was queued behind
    # Its outcome, from the moment a child starts it: the job can end (its child dead)
    # before its caller resumes, when the slot no longer holds it.
    outcome: asyncio.Future[Outcome] | None = None


class Pool:
    """`procs` children; `await run(job)` runs one job on the next idle child."""

    def __init__(
        self,
        procs: int,
        start_method: str = "forkserver",
        preload_modules: Sequence[str] = (),
        *,
        memory_check_interval_s: float = 0.05,
        max_tasks_per_child: int = 0,
        max_idle_rss_mb: int = 0,
        address_space_limit: bool = True,
        executor_keys: tuple = (None, 0.0),
        on_idle_gap: Callable[[float], None] | None = None,
        cores: Sequence[int] = (),
    ) -> None:
        self.procs = procs
        #: CPU slots held by running jobs; `cores`: the CPU of each slot when pinning.
        self.cpus = CpuSlots(procs, cores)
        self.on_idle_gap = on_idle_gap
        self.memory_check_interval_s = memory_check_interval_s
        self.max_tasks_per_child = max_tasks_per_child
        self.max_idle_rss_mb = max_idle_rss_mb
        self.address_space_limit = address_space_limit
        #: (qm.security.signing.Keyring | None, signature ttl): handed to each child as it
        #: starts, over the start pipe, never in its environment.
        self.executor_keys = executor_keys
        #: The CPU scheduling policy each child takes back before it runs tasks, when the
        #: supervisor gave up its own (qm/worker/sched_policy.py); None: as inherited.
        self.child_sched_policy: int | None = None
        self._context = multiprocessing.get_context(start_method)
        self._forkserver = start_method == "forkserver"
        if self._forkserver:
            self._context.set_forkserver_preload(["qm.worker.child", "qm.worker.forkserver_reaper", *preload_modules])
        # Only this process holds the write end: EOF in a child = the supervisor is gone.
        self._lifeline_r, self._lifeline_w = self._context.Pipe(duplex=False)
        self.slots: list[Slot] = []
        self._idle: collections.deque[Slot] = collections.deque()
        #: Jobs no child has yet, highest priority first (qm/worker/ready.py).
        self._waiting: ReadyJobs[_Waiting] = ReadyJobs(lambda waiting: waiting.job.priority)
        #: While tasks are short, each busy child also holds its next job in its pipe and
        #: starts it without waiting for this process (the supervisor sets it).
        self.pipeline = False
        self._closing = False
        self._sampler: asyncio.TimerHandle | None = None
        self._readiness = asyncio.Event()
        self.restarts = 0
        self.tasks_finished = 0

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start every child; return once all are ready (imports done, own session)."""
        self.slots = [self._spawn(index) for index in range(self.procs)]
        async with asyncio.timeout(timeout_s):
            while not all(slot.ready for slot in self.slots):
                self._readiness.clear()
                await self._readiness.wait()

    def _spawn(self, index: int) -> Slot:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        # typeshed: get_context() returns BaseContext, which lacks Process; every concrete context has it.
        process = self._context.Process(  # type: ignore[attr-defined]
            target=child_main,
            args=(
                child_conn,
                self._lifeline_r,
                self.address_space_limit,
                self._forkserver,
                self.executor_keys,
                self.max_idle_rss_mb > 0,
                self.child_sched_policy,
            ),
            name=f"qm-child-{index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        slot = Slot(index, process, parent_conn)
        loop = asyncio.get_running_loop()
        loop.add_reader(parent_conn.fileno(), self._on_reply, slot)
        loop.add_reader(process.sentinel, self._on_exit, slot)
        return slot

    async def run(
        self,
        job: Job,
        on_started: Callable[[], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Outcome:
        """Run a job on a child; `on_started` is called once a child has started it,
        `on_progress` with each update the task reports (qm.progress), all before the
        outcome, and `on_sent` once it is in a child's pipe (with `pipeline`, possibly behind
        a job the child is still running: it is committed to that child from then on).

        Cancelled before a child has it: the job never ran. Cancelled later: the child is
        killed (and replaced) as the job runs or starts, and the cancellation propagates.
        """
        if job.cpus > self.procs:  # it would wait first in line for good, and every job behind it
            raise ValueError(f"task {job.task_id} takes {job.cpus} CPU slots; this pool has {self.procs}")
        waiting = _Waiting(
            job, on_started, on_sent, asyncio.get_running_loop().create_future(), on_progress=on_progress
        )
        slot = self._next_idle() if not self._waiting and self.cpus.fits(job.cpus) else None
        if slot is not None:
            self._start(slot, waiting, send=True)
        else:
            self._waiting.append(waiting)
            self._dispatch()  # of a higher priority than the first in line, it is first now and may fit
            self._fill_pipelines()
        try:
            slot = await waiting.slot
        except asyncio.CancelledError:
            if waiting in self._waiting:
                self._waiting.remove(waiting)
                self._dispatch()  # it may have been the one holding the others back
            elif waiting.slot.done() and not waiting.slot.cancelled():
                started = waiting.slot.result()  # started just before the cancel came
                if started.job is job:
                    started.kill(None)
            raise  # if queued in a child, _start kills it as it starts (waiting.slot is cancelled)
        try:
            future = waiting.outcome
            assert future is not None  # set by _start, with waiting.slot
            return await future
        except asyncio.CancelledError:
            if slot.job is job:
                slot.kill(None)
            raise

    def kill_task(self, task_id: str, outcome: Outcome) -> bool:
        """End the task with `outcome`: kill its child if it runs, or as it starts if it is
        queued in a child. False if no child has it."""
        for slot in self.slots:
            if slot.job is not None and slot.job.task_id == task_id:
                slot.kill(outcome)
                return True
            if slot.queued is not None and slot.queued.job.task_id == task_id:
                slot.queued.cancel_outcome = outcome
                return True
        return False

    @property
    def busy(self) -> int:
        """Children running a job."""
        return sum(1 for slot in self.slots if slot.alive and slot.job is not None)

    @property
    def busy_cpus(self) -> int:
        """CPU slots held by running jobs (a job with cpus N holds N)."""
        return self.cpus.busy

    @property
    def idle(self) -> int:
        """Children ready and waiting for a job."""
        return sum(1 for slot in self._idle if slot.alive)

    def _next_idle(self) -> Slot | None:
        while self._idle:
            slot = self._idle.popleft()
            if slot.alive:
                return slot
        return None

    def _next_waiting(self, single_cpu: bool = False) -> _Waiting | None:
        """The first waiting job if it fits the free CPU slots now (`single_cpu`: and takes
        one), taken off the line; None otherwise: nothing overtakes it."""
        while self._waiting:
            waiting = self._waiting.first()
            if waiting.slot.done():  # cancelled meanwhile
                self._waiting.popleft()
                continue
            if single_cpu and waiting.job.cpus > 1:
                return None
            if not single_cpu and not self.cpus.fits(waiting.job.cpus):
                return None
            return self._waiting.popleft()
        return None

    def _dispatch(self) -> None:
        """Start waiting jobs on idle children while the first in line fits (CPU slots
        just freed may let more than one child start)."""
        while self._waiting and self._idle:
            waiting = self._next_waiting()
            if waiting is None:
                return
            slot = self._next_idle()
            if slot is None:
                self._waiting.appendleft(waiting)
                return
            self._start(slot, waiting, send=True)

    def _release(self, slot: Slot, ended_at_s: float | None = None) -> None:
        """A ready child with nothing to do: give it the next waiting job at once, else idle.
        `ended_at_s`: when its last task ended (child's clock), for the idle-gap measure."""
        waiting = self._next_waiting()
        if waiting is None:
            slot.gap_from_s = None
            self._idle.append(slot)
            self._dispatch()
            return
        self._start(slot, waiting, send=True)
        slot.gap_from_s = ended_at_s
        self._dispatch()
        self._fill_pipelines()

    def _fill_pipelines(self) -> None:
        """With `pipeline`, queue waiting jobs behind running ones, one per busy child (not
        behind a child's last task before it is recycled by count). Single-CPU jobs only,
        behind single-CPU jobs only, and none while a bigger job is first in line."""
        if not self.pipeline:
            return
        for slot in self.slots:
            if not self._waiting:
                return
            last_task = self.max_tasks_per_child and slot.tasks_done + 1 >= self.max_tasks_per_child
            if (
                slot.alive
                and slot.job is not None
                and slot.job.cpus == 1
                and slot.queued is None
                and slot.kill_outcome is None
                and not slot.retired
                and not slot.recycle_reason
                and not last_task
            ):
                waiting = self._next_waiting(single_cpu=True)
                if waiting is None:
                    return
                slot.queued = waiting
                waiting.prefer = self.cpus.held(slot)  # it takes over this job's slot as it starts
                self._send(slot, waiting, self.cpus.cores_of(slot))

    def _send(self, slot: Slot, waiting: _Waiting, cores: tuple[int, ...]) -> None:
        """Send the job with the CPUs its child pins it to (`cores`; () = not pinned)."""
        try:
            slot.conn.send_bytes(encode_job(waiting.job, cores or None))
        except OSError:
            pass  # the child just died: its sentinel resolves the job (or requeues a queued one)
        if waiting.on_sent is not None:
            waiting.on_sent()

    def _start(self, slot: Slot, waiting: _Waiting, send: bool) -> None:
        """The child starts `waiting.job` now (sent now, or already queued in its pipe)."""
        job = waiting.job
        loop = asyncio.get_running_loop()
        slot.job, slot.started_at_s, slot.kill_outcome = job, time.time(), None
        # Child i runs on CPU slot i where it can (its home; a multi-CPU job of another
        # child may hold it): with pinning, a job on another slot would move the child to
        # another core (sched_setaffinity, then a migration and a cold cache).
        cores = self.cpus.take(slot, job.cpus, waiting.prefer or (slot.index,))
        slot.on_progress = waiting.on_progress
        slot.peak_rss_bytes = 0
        slot.future = waiting.outcome = loop.create_future()
        if job.timeout_s > 0:
            slot.deadline = loop.call_later(
                job.timeout_s,
                slot.kill,
                Outcome(
                    TaskState.TIMED_OUT,
                    error=f"task {job.task_id} ({job.type}) exceeded its time limit of "
                    f"{job.timeout_s:g} s and was killed",
                ),
            )
        if job.memory_limit_mb > 0:
            self._ensure_sampler()
        if send:
            self._send(slot, waiting, cores)
        if waiting.slot.done():  # its caller was cancelled while it was queued in this child
            slot.kill(waiting.cancel_outcome)
            return
        waiting.slot.set_result(slot)
        if waiting.cancel_outcome is not None:
            slot.kill(waiting.cancel_outcome)
        if waiting.on_started is not None:
            waiting.on_started()

    def _finish(self, slot: Slot, outcome: Outcome) -> None:
        future, slot.future, slot.job, slot.on_progress = slot.future, None, None, None
        self.cpus.give_back(slot)
        if slot.deadline is not None:
            slot.deadline.cancel()
            slot.deadline = None
        self.tasks_finished += 1
        if future is not None and not future.done():
            future.set_result(outcome)

    def _on_reply(self, slot: Slot) -> None:
        try:
            frames = slot.frames.read()
        except OSError:
            frames = None
        if frames is None:
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())
            return  # the child is gone; _on_exit reports it
        self._take_frames(slot, frames, draining=False)

    def _take_frames(self, slot: Slot, frames: list[bytearray], draining: bool) -> None:
        """Handle the replies in `frames`, in order, until the slot stops taking them (its
        child retired by one; while draining a dead child, one that killed it)."""
        for data in frames:
            try:
                reply = decode_reply(data)
            except ValueError as exc:
                if not draining:  # a dead child's garbage only ends the draining
                    self._garbled(slot, exc)
                return
            if not (draining and reply.kind is ReplyKind.READY):
                self._handle_reply(slot, reply)
            if slot.conn.closed or (draining and slot.kill_outcome is not None):
                return

    def _garbled(self, slot: Slot, exc: ValueError) -> None:
        """The child wrote on its pipe what is not a reply (task code writing on an inherited
        descriptor): its replies cannot be trusted any more; kill it (CRASHED), respawn."""
        log.error("child %d (pid %d) wrote something that is not a reply on its pipe: %s", slot.index, slot.pid, exc)
        slot.kill(
            Outcome(
                TaskState.CRASHED,
                error=f"the task's process wrote on the worker's pipe something that is not a reply ({exc}); "
                "it was killed",
            )
        )
        if slot.job is None:
            _kill_group(slot.pid)

    def _handle_reply(self, slot: Slot, reply: Reply) -> None:
        if reply.kind is ReplyKind.PROGRESS:
            # An update sent just before its task ended may trail it: it names its task.
            if slot.on_progress is not None and slot.job is not None and reply.value == slot.job.task_id:
                assert reply.progress is not None  # a PROGRESS reply always carries one
                slot.on_progress(reply.progress)
            return
        if reply.kind is ReplyKind.READY:
            slot.ready = True
            self._readiness.set()
            self._release(slot)
            return
        if slot.gap_from_s is not None and self.on_idle_gap is not None:
            self.on_idle_gap(max(0.0, reply.received_at_s - slot.gap_from_s))
        outcome = _reply_outcome(reply, slot)
        if reply.received_at_s and reply.replied_at_s:
            outcome = dataclasses.replace(outcome, run_s=reply.replied_at_s - reply.received_at_s)
        self._finish(slot, outcome)
        slot.tasks_done += 1
        if slot.kill_outcome is not None:
            return  # a killed child is dying: _on_exit replaces the slot
        reason = slot.recycle_reason or self._recycle_reason(slot, reply.idle_rss_bytes)
        if slot.queued is not None:  # the child went straight on to the job behind it
            waiting, slot.queued = slot.queued, None
            slot.recycle_reason = reason  # if any: after that job, with nothing queued behind it
            self._start(slot, waiting, send=False)
            slot.gap_from_s = reply.replied_at_s
            self._fill_pipelines()
            return
        if not slot.alive:
            return  # replies read from a dead child's pipe (_on_exit)
        if reason:
            log.info("recycling child %d (pid %d): %s", slot.index, slot.process.pid, reason)
            slot.retired = True
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())
            slot.conn.close()  # the child exits on EOF; _on_exit spawns its successor
        else:
            self._release(slot, reply.replied_at_s)

    def _drain_replies(self, slot: Slot) -> None:
        """Read the replies a dead child sent before it died, in order: a job it finished
        is reported as it ended, and a queued job it went on to counts as started (what
        killed the child is then blamed on that job, not on the one before)."""
        while slot.kill_outcome is None:
            try:
                if not slot.conn.poll():
                    return
                frames = slot.frames.read()
            except (EOFError, OSError):
                return
            if frames is None:
                return
            self._take_frames(slot, frames, draining=True)

    def _recycle_reason(self, slot: Slot, idle_rss: int) -> str:
        """Why to retire the child now that its task is done; `idle_rss` is the RSS it
        reported after the task (it has no descendants left then: child.py kills them)."""
        if self.max_tasks_per_child and slot.tasks_done >= self.max_tasks_per_child:
            return f"ran {slot.tasks_done} tasks (max_tasks_per_child)"
        if self.max_idle_rss_mb:
            if idle_rss > self.max_idle_rss_mb * MIB:
                return (
                    f"idle RSS {idle_rss // MIB} MiB over {self.max_idle_rss_mb} MiB "
                    "(max_child_idle_rss_mb; a task leaks memory?)"
                )
        return ""

    def _on_exit(self, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(slot.process.sentinel)
        slot.alive = False
        if not slot.conn.closed:
            loop.remove_reader(slot.conn.fileno())
            self._drain_replies(slot)  # what it finished before it died is not lost
            slot.conn.close()
        slot.process.join()
        if slot.job is not None:
            outcome = slot.kill_outcome or Outcome(
                TaskState.CRASHED, error=describe_exit(slot.process.exitcode, slot.job)
            )
            log.warning(
                "task %s: child %d (pid %d) ended: %s", slot.job.task_id, slot.index, slot.process.pid, outcome.error
            )
            self._finish(slot, outcome)
        if slot.queued is not None:  # never started: first in line (of its priority) for the next child
            waiting, slot.queued = slot.queued, None
            if not waiting.slot.done():
                waiting.prefer = ()
                self._waiting.appendleft(waiting)
        if self._closing:
            return
        self._dispatch()  # the slots its job held are free: idle children may take waiting jobs
        if not slot.retired:
            self.restarts += 1
        if slot.ready:
            self.slots[slot.index] = self._spawn(slot.index)
        else:  # died during start-up (a plugin that crashes on import?): do not spin
            log.error(
                "child %d (pid %d) exited with %s before it was ready; restarting it in %.0f s",
                slot.index,
                slot.process.pid,
                slot.process.exitcode,
                STARTUP_FAILURE_DELAY_S,
            )
            loop.call_later(STARTUP_FAILURE_DELAY_S, self._respawn, slot.index)

    def _respawn(self, index: int) -> None:
        if not self._closing:
            self.slots[index] = self._spawn(index)

    # -- memory watchdog ---------------------------------------------------------------

    def _ensure_sampler(self) -> None:
        if self._sampler is None and not self._closing:
            self._sampler = asyncio.get_running_loop().call_later(self.memory_check_interval_s, self._sample)

    def _sample(self) -> None:
        """Kill any busy child over its memory limit; re-arm while limited jobs run."""
        self._sampler = None
        limited = [(slot, slot.job) for slot in self.slots if slot.alive and slot.job and slot.job.memory_limit_mb]
        for slot, job in limited:
            limit = job.memory_limit_mb * MIB
            if slot.sample_rss() > limit and slot.kill_outcome is None:
                slot.kill(
                    Outcome(
                        TaskState.MEMORY_EXCEEDED,
                        error=(
                            f"task {job.task_id} ({job.type}) used {slot.peak_rss_bytes / MIB:.0f} MiB "
                            f"(with its subprocesses), over its memory limit of {job.memory_limit_mb} MiB, "
                            "and was killed"
                        ),
                    )
                )
        if limited:
            self._ensure_sampler()

    # -- shutdown ----------------------------------------------------------------------

    async def stop(self) -> None:
        """Close every pipe (idle children exit) and kill what is still running."""
        self._closing = True
        if self._sampler is not None:
            self._sampler.cancel()
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            if slot.alive:
                loop.remove_reader(slot.process.sentinel)
                if not slot.conn.closed:
                    loop.remove_reader(slot.conn.fileno())
                    slot.conn.close()
                if slot.job is not None:
                    _kill_group(slot.pid)
        await asyncio.to_thread(self._join_all)
        self._lifeline_w.close()
        self._lifeline_r.close()

    def _join_all(self) -> None:
        deadline = time.monotonic() + CHILD_EXIT_TIMEOUT_S
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.exitcode is None:
                _kill_group(slot.pid)
                slot.process.join()


def _reply_outcome(reply: Reply, slot: Slot) -> Outcome:
    kind = reply.kind
    if kind is ReplyKind.OK:
        return Outcome(TaskState.SUCCEEDED, result=cast(bytes, reply.value))
    value = cast(str, reply.value)  # every other outcome reply carries the error text
    job = slot.job
    if kind is ReplyKind.SOFT_TIMEOUT:
        assert job is not None  # a child sends this only while it runs a job
        return Outcome(
            TaskState.TIMED_OUT,
            error=f"{value} (soft timeout {job.soft_timeout_s:g} s, time limit {job.timeout_s:g} s)",
        )
    if kind is ReplyKind.MEMORY:
        assert job is not None  # a child sends this only while it runs a job
        return Outcome(TaskState.MEMORY_EXCEEDED, error=f"{value}; memory limit {job.memory_limit_mb} MiB")
    if kind is ReplyKind.RETRY:
        return Outcome(TaskState.FAILED, error=value, retry_requested=True, retry_delay_s=reply.retry_delay_s)
    return Outcome(TaskState.FAILED, error=value, permanent=kind is ReplyKind.PERMANENT)


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
_SIGNAL_CAUSES: dict[int, str] = {
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
    return (
        f"{prefix} exited with code {exitcode} while the task ran "
        "(the task called os._exit() or sys.exit(), or the interpreter aborted)"
    )
