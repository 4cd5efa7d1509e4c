"""A worker's CPU slots: `--procs P` gives P slots, and a task with `cpus` N holds N of
them while it runs (one child runs it; the rest of its slots keep other children idle).

    Pool._start(child, job) ──take(child, N)──► slots held by that child's job
    Pool._finish(child)     ──give_back(child)─► free again: waiting jobs may start

Slots are numbered 0..P-1. With pinning (`pinning_cores`: worker.pin_cpus and P no more
than the CPUs the worker may use), slot i is CPU `cores[i]`, and the child running a job
is pinned (sched_setaffinity) to the CPUs of the slots it holds, so a 2-CPU task gets two
distinct cores for its threads or processes. Without pinning the slots are only a count:
the task is told how many CPUs it may use (QM_TASK_CPUS, qm.task_cpus()) and the kernel
schedules as it likes. On a host with fewer CPUs than --procs, pinning would put two
tasks on one core while another stays idle, so it is off there.
"""

from __future__ import annotations

import os
from typing import Hashable, Sequence


class CpuSlots:
    """Which of `procs` slots are free, and which a running job holds (keyed by its child)."""

    def __init__(self, procs: int, cores: Sequence[int] = ()) -> None:
        if cores and len(cores) < procs:
            raise ValueError(f"{len(cores)} cores for {procs} slots")
        self.procs = procs
        self.cores = tuple(cores)  # CPU of each slot; () = no pinning
        self._free = set(range(procs))
        self._held: dict[Hashable, tuple[int, ...]] = {}

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def busy(self) -> int:
        """Slots held by running jobs (a job with cpus N holds N)."""
        return self.procs - len(self._free)

    def fits(self, cpus: int) -> bool:
        """Enough slots are free now for a job taking `cpus`."""
        return cpus <= len(self._free)

    def take(self, holder: Hashable, cpus: int, prefer: Sequence[int] = ()) -> tuple[int, ...]:
        """Hold `cpus` free slots for `holder` (the `prefer`red ones first, if free); return
        the CPUs to pin it to, () without pinning. The caller checked `fits`."""
        if holder in self._held:
            raise RuntimeError(f"{holder!r} already holds slots {self._held[holder]}")
        if not self.fits(cpus):
            raise RuntimeError(f"{cpus} slots asked for, {len(self._free)} free")
        chosen = [index for index in prefer if index in self._free][:cpus]
        chosen += sorted(self._free - set(chosen))[: cpus - len(chosen)]
        self._free -= set(chosen)
        self._held[holder] = tuple(sorted(chosen))
        return self.cores_of(holder)

    def held(self, holder: Hashable) -> tuple[int, ...]:
        """The slot numbers `holder` holds (empty if none)."""
        return self._held.get(holder, ())

    def cores_of(self, holder: Hashable) -> tuple[int, ...]:
        """The CPUs `holder` is pinned to; () without pinning."""
        if not self.cores:
            return ()
        return tuple(self.cores[index] for index in self._held.get(holder, ()))

    def give_back(self, holder: Hashable) -> None:
        """Free what `holder` holds (nothing if it holds nothing)."""
        self._free.update(self._held.pop(holder, ()))


def pinning_cores(procs: int, pin: bool = True) -> tuple[int, ...]:
    """The CPU of each slot when the worker pins (`pin` and at least `procs` CPUs allowed
    to this process), else (): see the module docstring."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return ()
    allowed = sorted(os.sched_getaffinity(0))
    return tuple(allowed[:procs]) if procs <= len(allowed) else ()
