"""How many CPUs the running task may use: `qm.task_cpus()`, from inside a task.

A task declared (or submitted) with `cpus=N` takes N of its worker's slots and runs in one
child process; it may start up to N threads or processes of its own. The worker's child
sets, before each task:

* `QM_TASK_CPUS=N` in its environment (subprocesses inherit it; `qm.task_cpus()` reads it);
* with pinning on (qm/worker/cpu_slots.py), the child's CPU affinity to the N CPUs of its
  slots (`os.sched_getaffinity(0)` in the task shows them); otherwise back to every CPU
  the worker may use.

Outside a worker (a plain call, `qm.local`), `qm.task_cpus()` is 1 unless QM_TASK_CPUS
is set.
"""

from __future__ import annotations

import os
from typing import Sequence

#: Environment variable a task's process (and its subprocesses) reads its CPU allowance from.
ENV_VAR = "QM_TASK_CPUS"


def task_cpus() -> int:
    """CPUs the running task may use (its `cpus`; 1 outside a worker)."""
    try:
        return max(1, int(os.environ.get(ENV_VAR, "1")))
    except ValueError:
        return 1


def allow(cpus: int, cores: Sequence[int], every_core: Sequence[int]) -> None:
    """In a worker's child, before a task: tell it `cpus`, pin it to `cores`, or, with none
    given, let it run on `every_core` (what the child was allowed at its start)."""
    os.environ[ENV_VAR] = str(max(1, cpus))
    if not hasattr(os, "sched_setaffinity"):
        return
    target = set(cores or every_core)
    if target and target != os.sched_getaffinity(0):
        os.sched_setaffinity(0, target)
