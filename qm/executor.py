"""qm.Executor: concurrent.futures for the cluster.

    with qm.Executor(server="127.0.0.1:50051", secret=...) as executor:
        squares = list(executor.map(lambda x: x * x, range(200)))

Each call is pickled with cloudpickle, signed under `key_id` with a nonce and an expiry
(see qm/tasks/python.py for the trust model, qm/security/signing.py for the format),
submitted as a `python` task with the executor's limits, and its future resolved
from one status stream that the executor feeds with ids as it submits them. A call that
raises gives its future that exception; a call killed at its time limit gives
TimeoutError; any other failure (memory, crash, cancel) gives qm.errors.TaskError.

`submit` returns at once, as concurrent.futures' executors do: the call waits in the
executor's outbox, which one thread sends as SubmitTasks calls of up to `GROUP_ITEMS`, one
call at a time (nothing waits for company: a lone call goes at once, and the calls made
while one is out go together in the next). A future is pending until its call is sent
(`future.cancel()` takes it back), then running; a call the server refuses gets a
qm.client.RemoteError on its future, not from `submit`.
`shutdown(wait=True)` (the end of a `with` block) sends what waits before it returns; an
executor never shut down sends its outbox at interpreter exit (atexit), as
concurrent.futures' executors run their pending work.

A stream follows at most `stream_ids` tasks (the servers refuse more on one stream:
`server.max_stream_ids`, 10,000 by default; a server that allows fewer names its limit,
and the executor moves the calls over it to further streams of that size), so a
long-lived executor opens the next one
when its stream is full; a full stream is closed for new ids and ends by itself once its
tasks are all terminal. A stream the server ends early (`server.max_stream_s`, a restart)
is opened again with the calls still open, as the clients' waits are.

`map` submits its calls as groups (SubmitGroup, up to `GROUP_ITEMS` calls each): one
call and one confirm wait per group instead of one per item, and the group ids
(`map_group_ids`) show the map's progress in `qm status GROUP_ID`. A map needs no
callback (its results come back over the stream, in order), so its groups have none.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import cloudpickle
import grpc

from qm.client.client import Client, RemoteError
from qm.client.common import FOLLOW_IDS_PER_STREAM, group_request
from qm.config import MIN_SECRET_LENGTH
from qm.errors import BatchError, TaskError
from qm.executor_streams import ResultStream
from qm.security.signing import Keyring
from qm.states import TaskState

#: Calls per group `map` submits (server.max_batch_items is 1000 by default).
GROUP_ITEMS = 500


class Executor(concurrent.futures.Executor):
    """Runs callables as `python` tasks; futures complete as the tasks finish."""

    def __init__(
        self,
        server: str = "127.0.0.1:50051",
        *,
        secret: str,
        timeout_s: float = 0.0,
        memory_limit_mb: int = 0,
        queue: str = "",
        max_retries: int | None = None,
        key_id: str = "1",
        signature_ttl_s: float = 300.0,
        tls_ca: str | None = None,
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        stream_ids: int = FOLLOW_IDS_PER_STREAM,
    ) -> None:
        if len(secret or "") < MIN_SECRET_LENGTH:
            raise ValueError(
                f"qm.Executor needs the shared executor.secret of the servers and workers (at least "
                f"{MIN_SECRET_LENGTH} characters) and its executor.key_id"
            )
        self._client = Client(
            server, tls_ca=tls_ca, token=token, tls_cert=tls_cert, tls_key=tls_key, stream_ids=stream_ids
        )
        self._keys = Keyring(key_id, {key_id: secret})
        self._signature_ttl_s = signature_ttl_s
        self._options: dict[str, Any] = dict(
            queue=queue, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb, max_retries=max_retries
        )
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._shutdown = False
        self._outbox: list[tuple[bytes, concurrent.futures.Future]] = []  # calls `submit` made, not yet sent
        self._outbox_changed = threading.Condition()
        self._sending = False  # a submit_many of the outbox's calls is out
        self._submitter = threading.Thread(target=self._send_outbox, name="qm-executor-submit", daemon=True)
        self._submitter.start()
        _open_executors.add(self)
        self.map_group_ids: list[str] = []  # the groups `map` submitted, in order
        self._streams: list[ResultStream] = []  # streams not known to have ended; the last takes new ids
        self._streams_lock = threading.Lock()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedule `fn(*args, **kwargs)` as a `python` task; its future at once (the call
        is sent from the outbox: see the module docstring)."""
        payload = self._keys.sign(cloudpickle.dumps((fn, args, kwargs)), self._signature_ttl_s)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._outbox_changed:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._outbox.append((payload, future))
            self._outbox_changed.notify_all()
        return future

    def _send_outbox(self) -> None:
        """The submitter thread: send what waits, GROUP_ITEMS calls at a time, until
        shutdown and the outbox is empty."""
        while True:
            with self._outbox_changed:
                self._sending = False
                self._outbox_changed.notify_all()
                while not self._outbox and not self._shutdown:
                    self._outbox_changed.wait()
                if not self._outbox:
                    return
                taken, self._outbox = self._outbox[:GROUP_ITEMS], self._outbox[GROUP_ITEMS:]
                self._sending = True
            calls = [(payload, future) for payload, future in taken if future.set_running_or_notify_cancel()]
            try:
                self._send(calls)
            except Exception as exc:  # the submitter lives on; these calls' futures say why
                for _payload, future in calls:
                    if not future.done():
                        future.set_exception(exc)

    def _wait_outbox_sent(self) -> None:
        """Until every call `submit` took is sent (accepted, refused or failed)."""
        with self._outbox_changed:
            while (self._outbox or self._sending) and self._submitter.is_alive():
                self._outbox_changed.wait(1.0)

    def _send(self, calls: list[tuple[bytes, concurrent.futures.Future]]) -> None:
        """One SubmitTasks call's worth: accepted calls followed, refused ones failed."""
        if not calls:
            return
        try:
            task_ids: list[str | None] = list(
                self._client.submit_many([("python", payload) for payload, _ in calls], **self._options)
            )
            refused = []
        except BatchError as exc:
            task_ids, refused = exc.task_ids, exc.refused
        except Exception as exc:  # no server within submit_retry_s, or the client closed
            # The calls waiting behind these would meet the same: they fail now, not one
            # submit_retry_s per batch after another (an exit would wait for all of them).
            with self._outbox_changed:
                waiting, self._outbox = self._outbox, []
            for _payload, future in calls + [call for call in waiting if call[1].set_running_or_notify_cancel()]:
                future.set_exception(exc)
            return
        accepted = []
        with self._lock:
            for (_payload, future), task_id in zip(calls, task_ids, strict=True):
                if task_id is not None:
                    self._futures[task_id] = future
                    accepted.append(task_id)
        for item in refused:
            code = getattr(grpc.StatusCode, item.code, grpc.StatusCode.UNKNOWN)
            calls[item.index][1].set_exception(RemoteError(code, item.message, self._client.server, reason=item.reason))
        self._follow(accepted)

    def map(self, fn: Callable, *iterables: Any, timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Like concurrent.futures.Executor.map: results in order, each call a `python`
        task; the calls are submitted in groups of GROUP_ITEMS (see the module docstring)."""
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = list(zip(*iterables, strict=False))  # as map: up to the shortest
        futures: list[concurrent.futures.Future] = []
        for start in range(0, len(calls), GROUP_ITEMS):
            futures.extend(self._submit_group(fn, calls[start : start + GROUP_ITEMS]))
        return self._results_in_order(futures, deadline)

    def _submit_group(self, fn: Callable, calls: list[tuple]) -> list[concurrent.futures.Future]:
        items = [
            ("python", self._keys.sign(cloudpickle.dumps((fn, args, {})), self._signature_ttl_s)) for args in calls
        ]
        response = self._client.submit_group_request(group_request(items, None, self._options, None))
        self.map_group_ids.append(response.group_id)
        futures = []
        for task_id in response.task_ids:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            with self._lock:
                self._futures[task_id] = future
            futures.append(future)
        self._follow(list(response.task_ids))
        return futures

    def _results_in_order(self, futures: list[concurrent.futures.Future], deadline: float | None) -> Iterator[Any]:
        for future in futures:
            yield future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more calls; the outbox is still sent (its calls cancelled instead, with
        `cancel_futures`, and the tasks not yet finished cancelled too). `wait`: return once
        every call has its result; else that happens on a thread."""
        with self._outbox_changed:
            self._shutdown = True
            if cancel_futures:
                for _payload, future in self._outbox:
                    future.cancel()
            self._outbox_changed.notify_all()
        if cancel_futures:
            with self._lock:
                pending = [task_id for task_id, future in self._futures.items() if not future.done()]
            for task_id in pending:
                self._cancel(task_id)
        if wait:
            self._finish()
        else:
            threading.Thread(target=self._finish, name="qm-executor-shutdown", daemon=True).start()

    def _finish(self) -> None:
        """After shutdown: the outbox sent, every stream ended with its tasks, the client closed."""
        self._submitter.join()
        _open_executors.discard(self)
        with self._streams_lock:
            streams = list(self._streams)
        if streams:
            streams[-1].close()
        for stream in streams:
            stream.reader.join()
        self._client.close()

    def _cancel(self, task_id: str) -> None:
        try:
            self._client.cancel(task_id)
        except Exception:  # already finished, or unreachable: the stream settles the future
            pass

    def _follow(self, task_ids: list[str]) -> None:
        """Follow `task_ids` on the open stream, then on new ones as each fills up."""
        with self._streams_lock:
            while task_ids:
                if not self._streams or self._streams[-1].room <= 0:
                    if self._streams:
                        self._streams[-1].close()  # full: it ends once its tasks have
                    # Ended streams are dropped: a long-lived executor keeps only live ones.
                    self._streams = [stream for stream in self._streams if stream.reader.is_alive()]
                    self._streams.append(
                        ResultStream(self._client, self._client.stream_ids, self._settle, self._fail, self._follow)
                    )
                task_ids = self._streams[-1].follow(task_ids)  # what it had no room for goes on

    def _fail(self, task_ids: list[str], error: BaseException) -> None:
        """The stream following `task_ids` broke: their futures not yet done get `error`."""
        with self._lock:
            futures = [self._futures.pop(task_id, None) for task_id in task_ids]
        for future in futures:
            if future is not None and not future.done():
                future.set_exception(error)

    def _settle(self, status) -> None:
        with self._lock:
            future = self._futures.pop(status.task_id, None)
        if future is None or future.done():
            return
        state = TaskState.of_number(status.state)
        if state is TaskState.SUCCEEDED:
            try:
                kind, value = cloudpickle.loads(self._keys.verify(status.result, "result", check_expiry=False).data)
            except Exception as exc:  # a result we cannot trust or read
                future.set_exception(exc)
                return
            future.set_result(value) if kind == "ok" else future.set_exception(value)
        elif state is TaskState.TIMED_OUT:
            future.set_exception(TimeoutError(f"task {status.task_id}: {status.error}"))
        else:
            future.set_exception(TaskError(status.task_id, state, status.error))


#: Executors not shut down: their outboxes are sent at interpreter exit.
_open_executors: weakref.WeakSet[Executor] = weakref.WeakSet()


@atexit.register
def _send_outboxes_at_exit() -> None:
    """A script that ends without shutdown() still sends the calls it made, as
    concurrent.futures executors run theirs (each send is bounded by submit_retry_s)."""
    for executor in list(_open_executors):
        executor._wait_outbox_sent()
