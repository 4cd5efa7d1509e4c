"""Payload validation at submit time, off the event loop and within a time budget.

A task type's `check_payload` (decode, then the plugin's `validate`) is code the server
does not control: a slow validator, or an expensive payload (a 10,000-character
expression, deeply nested JSON), must not stall the other clients. So it runs on a small
pool of threads (`server.validate_threads`) and the submit waits at most
`server.validate_timeout_s` for it:

* over budget → ValidationError("payload", ...) → INVALID_ARGUMENT (the payload is too
  costly to accept; retrying the same one would not help);
* every thread held by a check already over its budget (validators that never return) →
  `ValidatorsBusy` → RESOURCE_EXHAUSTED (others' payloads; a retry may succeed). Checks
  within their budget are waited for: a batch's items queue for the threads.

Checked inline, on the event loop: a task type with no validator and a text or bytes codec
(decoding is linear in a payload already bounded by `server.max_payload_bytes`), and a
payload no longer than its type's `inline_check_max_bytes` (the type vouches such a check
costs less than the thread hand-over: for `math`, 24 bytes).

Python cannot stop a thread: a validator over budget keeps its thread until it returns,
and that thread counts as busy meanwhile, so at most `validate_threads` such runaway
validators exist at once; the event loop itself never waits on one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging

from qm.errors import QMError, ValidationError, ValidatorsBusy
from qm.registry import TaskType

log = logging.getLogger(__name__)


class PayloadValidators:
    """Runs `TaskType.check_payload` on `threads` threads, each call within `timeout_s`."""

    def __init__(self, timeout_s: float = 1.0, threads: int = 4) -> None:
        self.timeout_s = timeout_s
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="validator")
        self._free = asyncio.Semaphore(threads)
        self.overdue = 0  # threads held by a check past its budget (a runaway validator)

    async def check(self, declared: TaskType, payload: bytes) -> None:
        """Raise ValidationError unless `payload` is acceptable for `declared`."""
        if (declared.validate is None and declared.codec != "json") or len(payload) <= declared.inline_check_max_bytes:
            _check(declared, payload)  # linear in a bounded payload, or a small one its type vouches is cheap
            return
        await self._acquire()
        loop = asyncio.get_running_loop()
        state = {"overdue": False}

        def release() -> None:  # when the thread is really done, however long it took
            if state["overdue"]:
                self.overdue -= 1
            self._free.release()

        # In this call's context: a validator may read it (qm/security/signing.py reads the
        # submission's idempotency key, so a retried submit is not taken for a replay).
        done = self._pool.submit(contextvars.copy_context().run, _check, declared, payload)
        done.add_done_callback(lambda _done: loop.call_soon_threadsafe(release))
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.wrap_future(done)
        except TimeoutError:
            if not done.done():
                state["overdue"] = True
                self.overdue += 1
            log.warning(
                "validator of task type %s ran over its budget of %g s (server.validate_timeout_s)",
                declared.name,
                self.timeout_s,
            )
            raise ValidationError(
                "payload",
                (
                    f"validating this payload for task type {declared.name!r} took over {self.timeout_s:g} s "
                    "(server.validate_timeout_s); send a smaller or simpler payload"
                ),
            ) from None

    async def _acquire(self) -> None:
        """Wait for a free thread; ValidatorsBusy while every thread is held by a runaway.
        Checks within their budget free their thread soon, so waiting behind them (a batch's
        items, a burst) is bounded; only runaways are refused."""
        while True:
            if self.overdue >= self.threads:
                raise ValidatorsBusy(self.threads, self.timeout_s)
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._free.acquire()
                return
            except TimeoutError:
                continue  # look again whether the holders have become runaways

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check(declared: TaskType, payload: bytes) -> None:
    """In a validator thread: a plugin's own exception becomes a ValidationError naming it."""
    try:
        declared.check_payload(payload)
    except QMError:
        raise
    except RecursionError:
        raise ValidationError("payload", f"nested too deeply for task type {declared.name!r}") from None
    except Exception as exc:  # plugin code may raise anything; the client gets a clear refusal
        raise ValidationError(
            "payload", f"refused by the validator of task type {declared.name!r}: {type(exc).__name__}: {exc}"
        ) from None
