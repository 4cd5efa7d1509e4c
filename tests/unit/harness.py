"""Server logic + worker supervisor + real process pool in one process, over MemoryBroker."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

from qm.broker.memory import MemoryBroker
from qm.registry import discover
from qm.server.service import TaskService
from qm.server.store import Store, TaskRecord
from qm.states import TaskState
from qm.worker.pool import Pool
from qm.worker.supervisor import Supervisor
from tests.unit.aio import within

WORK_QUEUE = "qm.tasks.default"
MAX_PAYLOAD_BYTES = 1000


@dataclasses.dataclass
class System:
    service: TaskService
    broker: MemoryBroker
    store: Store
    pool: Pool | None = None
    supervisor: Supervisor | None = None


@contextlib.asynccontextmanager
async def server(tmp_path: Path):
    """A TaskService consuming its events queue, with no worker."""
    broker = MemoryBroker()
    store = Store(tmp_path / "server.db")
    service = TaskService(registry=discover(), store=store, broker=broker, max_payload_bytes=MAX_PAYLOAD_BYTES)
    await broker.connect()
    await service.start_events("test")
    try:
        yield System(service, broker, store)
    finally:
        await service.stop_events()
        await broker.close()
        await store.close()


@contextlib.asynccontextmanager
async def system(tmp_path: Path, procs: int = 2, prefetch: int = 4, running_event_delay_s: float = 0.05):
    """server() plus a worker: Supervisor "w1" on a real Pool, consuming the default queue."""
    async with server(tmp_path) as parts:
        pool = Pool(procs, "forkserver")
        await pool.start()
        supervisor = Supervisor(
            parts.broker, pool, "w1", ["default"], prefetch=prefetch, running_event_delay_s=running_event_delay_s
        )
        try:
            await supervisor.start()
            parts.pool, parts.supervisor = pool, supervisor
            yield parts
        finally:
            await within(supervisor.stop(drain_timeout_s=5.0))
            await within(pool.stop())


async def records_until_terminal(updates: asyncio.Queue, task_ids: set[str]) -> list[TaskRecord]:
    """Every record published for task_ids until each is terminal, in order (bounded wait)."""
    seen: list[TaskRecord] = []
    pending = set(task_ids)
    while pending:
        record = await within(updates.get())
        seen.append(record)
        if record.state.terminal:
            pending.discard(record.task_id)
    return seen


async def submit_and_wait(service: TaskService, task_type: str, payload: bytes) -> list[TaskRecord]:
    """Submit one task; return the records the hub published for it, the last terminal."""
    updates: asyncio.Queue = asyncio.Queue()
    record = await service.submit(task_type, payload)
    service.hub.follow(record.task_id, updates)  # submit returned without the loop running events
    try:
        return await records_until_terminal(updates, {record.task_id})
    finally:
        service.hub.unfollow(record.task_id, updates)


def states(records: list[TaskRecord]) -> list[TaskState]:
    return [record.state for record in records]
