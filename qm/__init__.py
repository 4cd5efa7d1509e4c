"""QueueMaster: a distributed task queue for CPU-heavy jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.2.0"  # the one version source (pyproject.toml reads it)

__all__ = ["Client", "Executor", "PermanentError", "Retry", "SoftTimeout", "__version__", "progress", "task_cpus"]

if TYPE_CHECKING:  # what type checkers see; at run time the names load lazily below
    from qm.client.client import Client
    from qm.cpu_allowance import task_cpus
    from qm.errors import PermanentError, Retry, SoftTimeout
    from qm.executor import Executor
    from qm.task_progress import progress


def __getattr__(name: str):
    # Lazy so `import qm` stays cheap (children, plugins) and does not pull in gRPC.
    if name == "Client":
        from qm.client.client import Client

        return Client
    if name == "aio":
        import qm.aio

        return qm.aio
    if name == "Executor":
        from qm.executor import Executor

        return Executor
    if name == "progress":
        from qm.task_progress import progress

        return progress
    if name == "task_cpus":
        from qm.cpu_allowance import task_cpus

        return task_cpus
    if name in ("SoftTimeout", "Retry", "PermanentError"):
        from qm import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'qm' has no attribute {name!r}")
