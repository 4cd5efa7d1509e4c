"""Per-caller quotas on the TaskQueue API: a submit rate limit and caps on result streams.

* Submit rate (`server.submit_rate_per_s`, `server.submit_burst`): a token bucket per
  caller (`caller_key`); SubmitTask takes one token, SubmitTasks one per item
  (SubmitGroup: one per member and callback), all or none. Refused: RESOURCE_EXHAUSTED,
  a message saying when to retry, and the wait in the trailing metadata
  `retry-pushback-ms` (what qm clients and gRPC's retry policy read).
  Nothing of a refused call is validated, stored or enqueued. Rate 0 = no limit. Reason
  code RATE_LIMITED (the servicer's error map, as every refusal).
* StreamTaskResults: at most `server.max_stream_ids` ids sent on one stream (repeats
  count), else INVALID_ARGUMENT naming the limit (retrying the same stream would not
  help; open another for more); a stream open longer than `server.max_stream_s` ends
  UNAVAILABLE, reason STREAM_EXPIRED, with a message saying so (qm clients open a new one
  for the ids still open, as after a server restart).

The caller is the authenticated principal when authentication is on
(`qm.server.auth.current_principal()`), else the peer's address without its port, so
one host's connections share one bucket.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib
import logging
import math
import sys
import time
from typing import Any, Callable

import grpc

from qm.errors import RateLimited, StreamExpired, StreamIdsOverLimit
from qm.server.admission import RETRY_PUSHBACK_KEY
from qm.server.servicer import abort_with, rich_status

log = logging.getLogger(__name__)

#: Buckets kept at once; the least recently used beyond that are forgotten (a forgotten
#: caller starts again with a full bucket), so many peers cannot grow the server's memory.
MAX_TRACKED_CALLERS = 10_000
#: Least time between two log lines about rate-limited calls.
LOG_INTERVAL_S = 10.0


#: Where authentication (another part of issue 12) exposes `current_principal() -> str | None`.
AUTH_MODULE = "qm.server.auth"


@functools.cache
def _auth_module():
    """The authentication module, looked up once (a failed import is not cached by Python,
    and searching for it on every submit would cost file system look-ups)."""
    try:
        return importlib.import_module(AUTH_MODULE)
    except ImportError:
        return None


def caller_key(context: Any) -> str:
    """Who is calling, for quotas: the principal if authentication named one, else the
    peer address without its port ("ipv4:10.0.0.5", "ipv6:[::1]")."""
    auth = sys.modules.get(AUTH_MODULE) or _auth_module()
    principal = auth.current_principal() if auth is not None else None
    if principal:
        return f"principal:{principal}"
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{address.rpartition(':')[0]}"
    return peer


class TokenBucket:
    """`rate_per_s` tokens a second, holding at most `burst`."""

    def __init__(self, rate_per_s: float, burst: int, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.at_s = now_s

    def take(self, count: int, now_s: float) -> float:
        """Take `count` tokens and return 0, or take none and return the seconds until
        there will be enough."""
        self.tokens = min(float(self.burst), self.tokens + (now_s - self.at_s) * self.rate_per_s)
        self.at_s = now_s
        if count <= self.tokens:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate_per_s


class SubmitRateLimiter:
    """One TokenBucket per caller key, the least recently used forgotten past `max_callers`."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = MAX_TRACKED_CALLERS,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def take(self, caller: str, count: int) -> float:
        """0 if `caller` may submit `count` tasks now, else the seconds to wait first."""
        if not self.rate_per_s:
            return 0.0
        now = self.clock()
        bucket = self._buckets.pop(caller, None) or TokenBucket(self.rate_per_s, self.burst, now)
        self._buckets[caller] = bucket
        if len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
        return bucket.take(count, now)


class QuotaInterceptor(grpc.aio.ServerInterceptor):
    """Applies the submit rate limit and the stream caps to the TaskQueue service."""

    def __init__(
        self,
        service: str,
        limiter: SubmitRateLimiter,
        max_stream_ids: int,
        max_stream_s: float,
        on_refused: Callable[[str], None] = lambda method: None,
    ) -> None:
        self.prefix = f"/{service}/"
        self.limiter = limiter
        self.max_stream_ids = max_stream_ids
        self.max_stream_s = max_stream_s
        self.on_refused = on_refused
        self._refused_since_log = 0
        self._logged_at = 0.0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        name = method[len(self.prefix) :]
        if name == "SubmitTask" and handler.unary_unary is not None:
            return handler._replace(unary_unary=self._rate_limited(handler.unary_unary, name, lambda r: 1))
        if name == "SubmitTasks" and handler.unary_unary is not None:
            return handler._replace(unary_unary=self._rate_limited(handler.unary_unary, name, lambda r: len(r.items)))
        if name == "SubmitGroup" and handler.unary_unary is not None:  # the members and the callback
            return handler._replace(
                unary_unary=self._rate_limited(handler.unary_unary, name, lambda r: len(r.items) + r.HasField("then"))
            )
        if name == "StreamTaskResults" and handler.stream_stream is not None:
            return handler._replace(stream_stream=self._capped_stream(handler.stream_stream))
        return handler

    def _rate_limited(self, behavior, method: str, tasks_in: Callable[[Any], int]):
        async def limited(request, context):
            count = tasks_in(request)
            if count <= self.limiter.burst:  # a bigger batch is refused by its own cap
                wait_s = self.limiter.take(caller_key(context), count)
                if wait_s:
                    await self._refuse(context, method, count, wait_s)
            return await behavior(request, context)

        return limited

    async def _refuse(self, context, method: str, count: int, wait_s: float) -> None:
        self.on_refused(method)
        retry_ms = max(1, math.ceil(wait_s * 1000))
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL_S:
            log.warning(
                "rate limit: refused %d submit call(s) with RESOURCE_EXHAUSTED (server.submit_rate_per_s "
                "%g, server.submit_burst %d), the last from %s",
                self._refused_since_log,
                self.limiter.rate_per_s,
                self.limiter.burst,
                caller_key(context),
            )
            self._refused_since_log, self._logged_at = 0, now
        status = rich_status(RateLimited(count, self.limiter.rate_per_s, self.limiter.burst, retry_ms))
        hint = (RETRY_PUSHBACK_KEY, str(retry_ms))
        await context.abort(status.code, status.details, trailing_metadata=(hint, *status.trailing_metadata))

    def _capped_stream(self, behavior):
        async def capped(request_iterator, context):
            responses = behavior(self._counted(request_iterator), context)
            deadline = asyncio.get_running_loop().time() + self.max_stream_s
            try:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            response = await anext(responses)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        await abort_with(context, StreamExpired(self.max_stream_s))
                    yield response
            finally:
                await responses.aclose()

        return capped

    async def _counted(self, request_iterator):
        """The client's requests, refused once they name more than max_stream_ids ids."""
        sent = 0
        async for request in request_iterator:
            sent += len(request.task_ids)
            if sent > self.max_stream_ids:
                raise StreamIdsOverLimit(sent, self.max_stream_ids)
            yield request
