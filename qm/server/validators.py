"""Payload validation at submit time, off the event loop and within a time budget.

A task type's `check_payload` (decode, then the plugin's `validate`) is code the server
does not control: a slow validator, or an expensive payload (a 10,000-character
expression, deeply nested JSON), must not stall the other clients. So it runs on a small
pool of threads (`server.validate_threads`) and the submit waits at most
`server.validate_timeout_s` for it:

* over budget → ValidationError("payload", ...) → INVALID_ARGUMENT (the payload is too
  costly to accept; retrying the same one would not help);
* every thread still busy after the budget (validators that never return) →
  `ValidatorsBusy` → RESOURCE_EXHAUSTED (others' payloads; a retry may succeed).

Python cannot stop a thread: a validator over budget keeps its thread until it returns,
and that thread counts as busy meanwhile, so at most `validate_threads` such runaway
validators exist at once; the event loop itself never waits on one.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
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

    async def check(self, declared: TaskType, payload: bytes) -> None:
        """Raise ValidationError unless `payload` is acceptable for `declared`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._free.acquire()
        except TimeoutError:
            raise ValidatorsBusy(self.threads, self.timeout_s) from None
        future = asyncio.get_running_loop().run_in_executor(self._pool, _check, declared, payload)
        future.add_done_callback(lambda _done: self._free.release())  # when the thread is really done
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            log.warning("validator of task type %s ran over its budget of %g s (server.validate_timeout_s)",
                        declared.name, self.timeout_s)
            raise ValidationError("payload", (
                f"validating this payload for task type {declared.name!r} took over {self.timeout_s:g} s "
                "(server.validate_timeout_s); send a smaller or simpler payload")) from None

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
        raise ValidationError("payload", f"refused by the validator of task type {declared.name!r}: "
                                         f"{type(exc).__name__}: {exc}") from None
