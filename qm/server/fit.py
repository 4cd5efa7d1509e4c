"""How many CPU slots a task takes, and whether any worker could ever run it.

A task takes `cpus` slots on a worker (the submission's, else its type's `TaskType.cpus`,
else 1). Two refusals at submit time, so a task no worker could run never waits forever:

* over `server.max_task_cpus` (default 64): INVALID_ARGUMENT naming `cpus`;
* over the largest `--procs` of the live workers consuming its queue, as their heartbeats
  tell (qm/server/workers.py): FAILED_PRECONDITION, reason NO_WORKER_FITS, naming `cpus`.
  With no live worker of the queue known (none started yet, or this server just started
  and has heard no heartbeat), the task is accepted: workers may come later, and a
  cluster starting up must not refuse its first submits. Draining workers still count
  (they come back), lost and stopped ones do not.
"""

from __future__ import annotations

from typing import Protocol

from qm.errors import NoWorkerFits, ValidationError
from qm.registry import TaskType

#: Default of server.max_task_cpus.
DEFAULT_MAX_TASK_CPUS = 64


class WorkerSizes(Protocol):
    def largest_procs(self, queue: str) -> int | None: ...


def resolve_cpus(declared: TaskType, requested: int, max_task_cpus: int) -> int:
    """The submission's cpus, else the type's; ValidationError over the server's cap."""
    if requested < 0:
        raise ValidationError("cpus", f"{requested} is negative; ask for 1 or more CPUs (0 = the task type's)")
    cpus = requested or declared.cpus or 1
    if max_task_cpus and cpus > max_task_cpus:
        source = "" if requested else f" (task type {declared.name!r} declares cpus={declared.cpus})"
        raise ValidationError(
            "cpus", f"{cpus}{source} exceeds the server's maximum of {max_task_cpus} (server.max_task_cpus)"
        )
    return cpus


def check_fits(cpus: int, queue: str, workers: WorkerSizes) -> None:
    """NoWorkerFits if the live workers of `queue` are all smaller than `cpus`."""
    if cpus <= 1:
        return
    largest = workers.largest_procs(queue)
    if largest is not None and cpus > largest:
        raise NoWorkerFits(cpus, queue, largest)
