"""Writes of the same moment share one PostgreSQL transaction (issue 9).

    write(args) ──► queued ──(a writer, next loop turn)──► one pipelined executemany: one
                                                            round trip, one commit, for all
                    a batch failing on one row (`alone_on`) ──► each row on its own again,
                                                                so only that caller gets it

Under `submit_many` hundreds of task inserts come in one loop turn; each on its own was a
statement, a round trip and a commit, with a socket write each: about a quarter of the
server's time, and most of PostgreSQL's. asyncpg's `executemany` sends all the rows'
Bind/Execute messages in one go with one Sync, so the batch is atomic. A caller is
answered only once the transaction holding its row committed (or failed).

Up to `writers` batches are in flight at once (each on a pooled connection); what comes
meanwhile joins the next one, so a lone write goes out at once, as before, and a burst is
one transaction.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence

#: Batches in flight at once, by default.
WRITERS = 2


class BatchedWrites:
    """Joins concurrent `write(args)` calls into `write_many(rows)` calls; `write_one(args)`
    for a batch of one, and for each row again when `write_many` raised `alone_on`."""

    def __init__(
        self,
        write_many: Callable[[Sequence[tuple]], Awaitable[Any]],
        write_one: Callable[[tuple], Awaitable[Any]],
        alone_on: type[BaseException],
        writers: int = WRITERS,
    ) -> None:
        self._write_many = write_many
        self._write_one = write_one
        self._alone_on = alone_on
        self._writers = writers
        self._queued: list[tuple[tuple, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()
        self.batches = 0  # write_many calls made (for tests and benchmarks)

    async def write(self, args: tuple) -> None:
        """Written and committed on return, or the exception of the row's own write."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queued.append((args, future))
        if len(self._running) < self._writers:
            writer = asyncio.create_task(self._drain(), name="store-batched-writes")
            self._running.add(writer)
            writer.add_done_callback(self._running.discard)
        await future

    async def close(self) -> None:
        """Let the batches in flight and queued finish."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _drain(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                await self._write(batch)
            except BaseException:
                for _args, future in batch:
                    future.cancel()
                raise

    async def _write(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        if len(batch) > 1:
            try:
                await self._write_many([args for args, _future in batch])
            except self._alone_on:
                pass  # one row spoilt the lot: below, each on its own says which
            except Exception as exc:
                for _args, future in batch:
                    _settle(future, exc)
                return
            else:
                self.batches += 1
                for _args, future in batch:
                    _settle(future, None)
                return
        for args, future in batch:
            try:
                await self._write_one(args)
            except Exception as exc:
                _settle(future, exc)
            else:
                _settle(future, None)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
