"""Progress reports on their way out of a worker (qm/task_progress.py is the task's side).

    child:      qm.progress() ──► ChildReporter: keeps the latest; its thread sends it on
                                  the slot's pipe, at most every CHILD_SEND_INTERVAL_S
    supervisor: Pool ──► on_progress ──► ProgressLimiter (one per running task): at most one
                                  event per EVENT_INTERVAL_S, the latest always kept (a
                                  trailing one leaves when the window closes) ──► qm.events

Neither side ever makes the task wait: the child's thread does the pipe writes, and the
supervisor publishes without waiting for the confirm. A task's limiter is closed before
its outcome is reported, so the last update kept but not sent is dropped, never sent
after the outcome (a server ignores one that comes late anyway).
"""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import Connection
from typing import Callable, Protocol

from qm.task_progress import Progress
from qm.worker.jobs import Reply, ReplyKind, encode_reply

#: Least time between two updates a child sends on its pipe (the supervisor's limit is lower).
CHILD_SEND_INTERVAL_S = 0.05
#: Least time between two progress events of one task: at most 10 a second.
EVENT_INTERVAL_S = 0.1


class ChildReporter:
    """The child's side: `report` stores the latest update for the running task and
    returns; a daemon thread sends it. `send_lock` is held for every write on the pipe
    (this thread's and the child's replies), so an update of a task is always sent before
    its outcome reply, never after it."""

    def __init__(self, conn: Connection, send_lock: threading.Lock, interval_s: float = CHILD_SEND_INTERVAL_S) -> None:
        self._conn = conn
        self._send_lock = send_lock
        self._interval_s = interval_s
        self._changed = threading.Condition()
        self._task_id: str | None = None
        self._pending: Progress | None = None
        self._thread: threading.Thread | None = None

    def begin(self, task_id: str) -> None:
        with self._changed:
            self._task_id, self._pending = task_id, None

    def end(self) -> None:
        """The task is over: its unsent update is dropped (its outcome follows)."""
        with self._changed:
            self._task_id, self._pending = None, None

    def report(self, update: Progress) -> None:
        with self._changed:
            if self._task_id is None:
                return
            self._pending = update
            self._changed.notify()
            if self._thread is None:  # under the lock: threads of the task may report at once
                self._thread = threading.Thread(target=self._send_forever, name="qm-progress", daemon=True)
                self._thread.start()

    def _send_forever(self) -> None:
        while True:
            with self._changed:
                while self._pending is None:
                    self._changed.wait()
            with self._send_lock:
                with self._changed:  # the task may have ended meanwhile: then nothing goes
                    task_id, update, self._pending = self._task_id, self._pending, None
                if task_id is None or update is None:
                    continue
                try:
                    self._conn.send_bytes(encode_reply(Reply(ReplyKind.PROGRESS, task_id, progress=update)))
                except (OSError, ValueError):
                    return  # the pipe is gone: the supervisor stopped this child
            time.sleep(self._interval_s)


class Handle(Protocol):
    def cancel(self) -> None: ...


#: call_later(delay_s, callback) → a handle to cancel it (asyncio's loop.call_later).
Scheduler = Callable[[float, Callable[[], None]], Handle]


class ProgressLimiter:
    """The supervisor's side, one per running task: the first update goes out at once;
    later ones within `interval_s` of the last sent wait for the window to close, and
    only the latest of them is sent then (the ones it replaced count as `coalesced`)."""

    def __init__(
        self,
        send: Callable[[Progress], None],
        call_later: Scheduler,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = EVENT_INTERVAL_S,
    ) -> None:
        self._send = send
        self._call_later = call_later
        self._clock = clock
        self._interval_s = interval_s
        self._last_sent_s: float | None = None
        self._pending: Progress | None = None
        self._timer: Handle | None = None
        self.closed = False
        self.sent = 0
        self.coalesced = 0

    def offer(self, update: Progress) -> None:
        if self.closed:
            return
        now_s = self._clock()
        if self._timer is None and (self._last_sent_s is None or now_s - self._last_sent_s >= self._interval_s):
            self._emit(update, now_s)
            return
        if self._pending is not None:
            self.coalesced += 1
        self._pending = update
        if self._timer is None:
            assert self._last_sent_s is not None  # a timer is armed only after a send
            self._timer = self._call_later(self._last_sent_s + self._interval_s - now_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        update, self._pending = self._pending, None
        if update is not None and not self.closed:
            self._emit(update, self._clock())

    def _emit(self, update: Progress, now_s: float) -> None:
        self._last_sent_s = now_s
        self.sent += 1
        self._send(update)

    def close(self) -> int:
        """The task ended: nothing more goes out. Returns 1 if an update was kept unsent."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        dropped, self._pending = int(self._pending is not None), None
        return dropped
