"""The status streams of a qm.Executor (qm/executor.py): each follows at most `capacity`
calls, fed as they are submitted, on a thread of its own, and is resumed like the
clients' waits."""

from __future__ import annotations

import queue as queue_module
import threading
import time
from typing import Callable, Iterator

import grpc

from qm._proto.qm.v1 import task_queue_pb2
from qm.client.client import Client
from qm.client.common import Follow, response_statuses, stream_error
from qm.errors import QMError

#: Sentinel ending a call's request iterator.
_CLOSE = object()


class ResultStream:
    """One StreamTaskResults stream of an Executor, fed ids as calls are submitted (at
    most `capacity`), read on a thread of its own that settles the futures. Resumed like
    the clients' waits (qm.client.common.Follow): a stream the server ends early (its
    `server.max_stream_s` lifetime, a restart, a failover) is opened again with the ids
    still open, within the client's `reconnect_s`; past that their futures fail."""

    def __init__(
        self,
        client: Client,
        capacity: int,
        settle: Callable[[task_queue_pb2.TaskStatus], None],
        fail: Callable[[list[str], BaseException], None],
        overflow: Callable[[list[str]], None],
    ) -> None:
        self.client = client
        self._settle = settle  # settle(status): a call's final status came
        self._fail = fail  # fail(ids, error): these calls' futures get error
        self._overflow = overflow  # overflow(ids): ids over a server's lower limit, to follow elsewhere
        self.followed = 0  # ids sent on it (it takes at most its Follow's stream_ids)
        self._follow = Follow([], client._failover, None, client.reconnect_s, final_only=True, stream_ids=capacity)
        self._lock = threading.Lock()  # the follow state, the open call's queue, closed
        self._queue: queue_module.Queue = queue_module.Queue()  # the open call's new ids
        self._closed = False
        self.reader = threading.Thread(target=self._run, name="qm-executor", daemon=True)
        self.reader.start()

    @property
    def room(self) -> int:
        """Ids it may still take: `capacity`, or the lower limit a server named since."""
        return self._follow.stream_ids - self.followed

    def follow(self, task_ids: list[str]) -> list[str]:
        """Follow as many of `task_ids` as there is room for; the rest is returned."""
        with self._lock:
            room = max(0, self.room)
            taken, rest = task_ids[:room], task_ids[room:]
            if taken:
                self.followed += len(taken)
                self._follow.open.update(dict.fromkeys(taken))
                self._queue.put(taken)
        return rest

    def close(self) -> None:
        """No more ids: the server ends the stream once its tasks are all terminal."""
        with self._lock:
            self._closed = True
            self._queue.put(_CLOSE)

    def _open(self) -> Iterator[task_queue_pb2.StreamTaskResultsRequest]:
        """A new call's requests: the ids open now, then each lot `follow` adds. (Under the
        lock: every id is in exactly one of the two.)"""
        self._queue.put(_CLOSE)  # the previous call's requests end, if it still waits for ids
        self._queue = queue_module.Queue()
        if self._closed:
            self._queue.put(_CLOSE)
        return self._requests(self._follow.requests(), self._queue)

    @staticmethod
    def _requests(first: list, lots: queue_module.Queue) -> Iterator[task_queue_pb2.StreamTaskResultsRequest]:
        yield from first
        while True:
            item = lots.get()
            if item is _CLOSE:
                return
            yield task_queue_pb2.StreamTaskResultsRequest(task_ids=item, final_only=True, batched=True)

    def _run(self) -> None:
        while True:
            with self._lock:
                requests = self._open()
            address = self._follow.address
            call = self.client._stub_at(address).StreamTaskResults(requests)
            code = details = reason = limit = None
            try:
                for response in call:
                    for proto in response_statuses(response):
                        with self._lock:
                            status = self._follow.accept(proto)
                        if status is not None and status.terminal:
                            self._settle(proto)
            except grpc.RpcError as exc:
                code, details, reason, limit = stream_error(exc)
            finally:
                call.cancel()
            with self._lock:
                if self._closed and self._follow.done:
                    return
            try:
                delay_s = self._follow.interrupted(address, code, details, reason, limit)
            except QMError as exc:  # no server within reconnect_s (or the stream refused)
                with self._lock:
                    left = list(self._follow.open)
                self._fail(left, ConnectionError(f"status stream from {self.client.server} ended: {exc}"))
                return
            self._shed_over_limit()
            time.sleep(delay_s)

    def _shed_over_limit(self) -> None:
        """A server lets a stream follow fewer ids than this one holds (it refused the
        stream, naming its server.max_stream_ids): this stream keeps that many, takes no
        more, and hands the rest to `overflow` (the executor's further streams)."""
        with self._lock:
            limit = self._follow.stream_ids  # lowered by Follow.interrupted; `room` follows it
            self.client.stream_ids = min(self.client.stream_ids, limit)  # the executor's next streams
            if len(self._follow.open) <= limit:
                return
            shed = list(self._follow.open)[limit:]
            for task_id in shed:
                del self._follow.open[task_id]
        self._overflow(shed)
