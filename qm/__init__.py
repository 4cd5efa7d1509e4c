"""QueueMaster: a distributed task queue for CPU-heavy jobs."""

__version__ = "0.1.0"


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
    if name in ("SoftTimeout", "Retry", "PermanentError"):
        from qm import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'qm' has no attribute {name!r}")
