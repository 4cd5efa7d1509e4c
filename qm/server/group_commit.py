"""Group commit: the store's writes share SQLite transactions, on a thread of their own.

```
 event loop                                  writer thread (one connection)
 write(work) ──► pending list ──┐
 write(work) ──► pending list ──┤  one loop turn later, or when the
 defer(item) ──► deferred set ──┤  transaction before is done:
                                └──► BEGIN IMMEDIATE
                                       flush(deferred items)
                                       SAVEPOINT; work 1; RELEASE     (a work that raises is
                                       SAVEPOINT; work 2; RELEASE      rolled back alone and
                                       ...                             fails only its caller)
                                     COMMIT
 futures resolved ◄──────────────────────┘ (each caller's result, after the commit)
```

Every write queued while one transaction runs goes into the next: under load a
transaction carries many submits and event batches, with no wait added when idle (the
first write after a quiet spell starts a transaction on the next loop turn). A deferred
item (a confirm mark) never starts a transaction by itself until `DEFERRED_LINGER_S`
passed: it rides with the next write. The loop never runs SQLite here; it only hands work
over and takes results back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from typing import Any, Callable, Generic, Hashable, Protocol, TypeVar

from qm.os_thread_names import name_this_thread

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item", bound=Hashable)

#: Longest a deferred item waits for a write to ride with before it gets a transaction of
#: its own (it is durable only once written; see `GroupCommit.defer`).
DEFERRED_LINGER_S = 0.2


class TransactionObserver(Protocol):
    def store_transaction(self, writes: int, seconds: float) -> None:
        """A transaction committed `writes` writes (deferred items included) in `seconds`."""


class GroupCommit(Generic[Item]):
    """Runs write work on one SQLite connection, grouped into transactions, on a thread.

    `flush(db, items)` writes deferred items inside a transaction. Use from one event loop;
    `close()` writes what is pending and stops the thread.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        flush: Callable[[sqlite3.Connection, list[Item]], None],
        observer: TransactionObserver | None = None,
        name: str = "store-writer",
    ) -> None:
        # A plain thread fed by a SimpleQueue (C): the hand-over costs one put and one
        # call_soon_threadsafe per transaction, less than a ThreadPoolExecutor's locks.
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._db: sqlite3.Connection = self._on_thread(connect).result()
        self._flush = flush
        self._observer = observer
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._deferred: list[Item] = []
        self._unwritten: set[Item] = set()
        self._wakeup: asyncio.Future | None = None  # set when there is work to commit
        self._linger: asyncio.TimerHandle | None = None  # wakes the writer for deferred items
        self._writer: asyncio.Task | None = None
        self._closing = False
        self._closed = False

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run work(db) in the next transaction; return its result once that committed."""
        if self._closing:
            raise RuntimeError("the store is closed")
        future: asyncio.Future = self._start().create_future()
        self._pending.append((work, future))
        self._wake_writer()
        return await future

    def defer(self, item: Item) -> None:
        """Write `item` with the next transaction (at most DEFERRED_LINGER_S from now)."""
        self._start()
        self._deferred.append(item)
        self._unwritten.add(item)
        if self._wakeup is not None:  # the writer waits for work: the item is work later
            self._arm_linger()

    def unwritten(self, item: Item) -> bool:
        """Whether `item` was deferred and is not yet committed."""
        return item in self._unwritten

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run work(db) on the writer thread now and wait for it (set-up only, not serving)."""
        return self._on_thread(work, self._db).result()

    async def close(self) -> None:
        """Write everything pending (deferred items too), then stop the thread."""
        self._closing = True
        if self._writer is not None:
            self._wake_writer()
            await self._writer
        if not self._closed:
            self._closed = True
            self._on_thread(self._db.close).result()
            self._jobs.put(None)
            self._thread.join()

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._writer is None:
            self._writer = loop.create_task(self._run(), name="store-writer")
        return loop

    def _wake_writer(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _arm_linger(self) -> None:
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(DEFERRED_LINGER_S, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger = None
        self._wake_writer()

    async def _wait_for_work(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until a write is queued, or a deferred item has waited DEFERRED_LINGER_S."""
        self._wakeup = loop.create_future()
        if self._deferred:
            self._arm_linger()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _run(self) -> None:
        """Until closed: wait for work (or a deferred item's linger), commit a group."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not self._closing:
                await self._wait_for_work(loop)
            if not self._pending and not self._deferred:
                if self._closing:
                    return
                continue
            group, self._pending = self._pending, []
            deferred, self._deferred = self._deferred, []
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            try:
                outcomes = await self._commit_on_thread(loop, [work for work, _ in group], deferred)
            except BaseException as exc:  # the transaction failed as a whole: every caller hears it
                self._deferred[:0] = deferred  # not written: they ride with the next transaction
                for _work, future in group:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.error("store transaction of %d write(s) failed: %s", len(group) + len(deferred), exc)
                continue
            self._unwritten.difference_update(deferred)
            for (_work, future), (ok, value) in zip(group, outcomes, strict=True):
                if future.done():  # its caller gave up waiting (cancelled); the write stands
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _serve(self) -> None:
        """The writer thread: run jobs until None."""
        name_this_thread()
        while (job := self._jobs.get()) is not None:
            job()

    def _on_thread(self, function: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run function(*args) on the writer thread (set-up and close; not the hot path)."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            try:
                result.set_result(function(*args))
            except BaseException as exc:
                result.set_exception(exc)

        self._jobs.put(job)
        return result

    def _commit_on_thread(
        self, loop: asyncio.AbstractEventLoop, group: list[Callable[[sqlite3.Connection], Any]], deferred: list[Item]
    ) -> asyncio.Future[list[tuple[bool, Any]]]:
        """_commit on the writer thread; its outcome comes back with one call_soon_threadsafe."""
        done: asyncio.Future[list[tuple[bool, Any]]] = loop.create_future()

        def job() -> None:
            try:
                outcomes = self._commit(group, deferred)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle_error, done, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, outcomes)

        self._jobs.put(job)
        return done

    def _commit(self, group: list[Callable[[sqlite3.Connection], Any]], deferred: list[Item]) -> list[tuple[bool, Any]]:
        """On the writer thread: one transaction for the group; each work in a savepoint."""
        started = time.perf_counter()
        db = self._db
        outcomes: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            if deferred:  # first: a work reading them sees them written
                self._flush(db, deferred)
            for work in group:
                db.execute("SAVEPOINT work")
                try:
                    outcomes.append((True, work(db)))
                except Exception as exc:
                    db.execute("ROLLBACK TO work")
                    outcomes.append((False, exc))
                db.execute("RELEASE work")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if self._observer is not None:
            self._observer.store_transaction(len(group) + len(deferred), time.perf_counter() - started)
        return outcomes


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _settle_error(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
