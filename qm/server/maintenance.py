"""Store upkeep that costs the event loop the same however big the store is.

Deleting many rows is work proportional to the rows, so it is never one statement: the
store deletes at most `batch_rows` per call (one short transaction), and these helpers
call it again, handing the event loop back between batches, so submits, events and
streams are served while a retention sweep or a purge of a million rows goes on.

Store sizes for the gauges come from the store's counters (kept by triggers, no COUNT(*));
WAL checkpoints run on the store's own thread (`Store.start_checkpoints`).
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable

from qm.server.store import DELETE_BATCH_ROWS
from qm.server.store_api import TaskStore


async def delete_in_batches(delete_batch: Callable[[int], Awaitable[int]], batch_rows: int = DELETE_BATCH_ROWS) -> int:
    """Call delete_batch(batch_rows) until it deletes fewer than batch_rows; return the
    total. The event loop runs other work between two batches."""
    total = 0
    while True:
        removed = await delete_batch(batch_rows)
        total += removed
        if removed < batch_rows:
            return total
        await asyncio.sleep(0)


async def purge_finished(store: TaskStore, before_s: float, batch_rows: int = DELETE_BATCH_ROWS) -> int:
    """Delete every task that finished before `before_s`, in batches; return how many."""
    return await delete_in_batches(lambda limit: store.purge_finished(before_s, limit), batch_rows)


async def purge_dead_letters(
    store: TaskStore, batch_rows: int = DELETE_BATCH_ROWS, dead_before_s: float = math.inf
) -> int:
    """Delete every dead letter (dead before `dead_before_s`, if given), oldest first, in
    batches; return how many."""
    return await delete_in_batches(lambda limit: store.remove_dead_letters(None, limit, dead_before_s), batch_rows)
