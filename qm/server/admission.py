"""Overload control of qm-server's gRPC server: queue calls, or refuse them, never drop them.

Why (issue 16, item 2): grpc.aio takes calls from gRPC core one at a time on the event
loop. A burst arriving faster than that waits in core's queue of calls not yet taken
("pending requests"), and core itself sheds that queue: past
`grpc.server.max_pending_requests` (1,000 by default) it drops new calls at random, and
always past `grpc.server.max_pending_requests_hard_limit` (3,000), and it drops calls
waiting longer than `grpc.server_max_unrequested_time_in_server` (30 s). A dropped call
ends CANCELLED at the client, with details "CANCELLED", and the application never saw it:
nothing is logged. With 2,000 concurrent submits about 1 in 10 ended so.

So qm-server:

* turns core's shedding off (`CORE_OPTIONS`): a burst waits in core's queue until the
  event loop takes each call; the client's deadline bounds the wait;
* enforces its own, documented limit instead (`server.max_concurrent_rpcs`): a TaskQueue
  call that would exceed it is answered at once with RESOURCE_EXHAUSTED (reason code
  OVERLOADED, from the servicer's error map), a message naming the limit and a retry hint,
  the trailing metadata `retry-pushback-ms` (the key gRPC's retry policy reads), and
  counted in `qm_server_grpc_refused_total`;
* handles every call it took to completion (a call is only cancelled by its client or its
  deadline, or by the server's stop after `server.grace_s`).

Health checks and reflection are never refused, so probes keep working under overload.
"""

from __future__ import annotations

import logging
import time

import grpc

from qm.errors import Overloaded
from qm.metrics import ServerMetrics
from qm.server.servicer import rich_status

log = logging.getLogger(__name__)

#: Core's own shedding of calls not yet taken by the application, turned off (see above).
#: Both pending limits at INT32_MAX; the unrequested-time limit at a day (seconds).
CORE_OPTIONS = (
    ("grpc.server.max_pending_requests", 2**31 - 1),
    ("grpc.server.max_pending_requests_hard_limit", 2**31 - 1),
    ("grpc.server_max_unrequested_time_in_server", 86400),
)
#: Trailing metadata key of the retry hint (milliseconds), as in gRPC's retry design (A6).
RETRY_PUSHBACK_KEY = "retry-pushback-ms"
#: The hint given with a refusal.
RETRY_AFTER_MS = 200
#: Least time between two log lines about refused calls.
LOG_INTERVAL_S = 10.0


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Count the calls of `service` being handled; refuse one beyond `limit` (0 = no limit)."""

    def __init__(self, service: str, limit: int, metrics: ServerMetrics, retry_after_ms: int = RETRY_AFTER_MS) -> None:
        self.prefix = f"/{service}/"
        self.limit = limit
        self.metrics = metrics
        self.retry_after_ms = retry_after_ms
        self.in_flight = 0
        self._refused_since_log = 0
        self._logged_at = 0.0
        metrics.grpc_in_flight.set_function(lambda: self.in_flight)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.limit or not handler_call_details.method.startswith(self.prefix):
            return handler
        method = handler_call_details.method[len(self.prefix) :]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._streaming(handler.stream_stream, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream, method))
        return handler._replace(stream_unary=self._unary(handler.stream_unary, method))

    def _unary(self, behavior, method: str):
        async def admitted(request, context):
            await self._enter(context, method)
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1

        return admitted

    def _streaming(self, behavior, method: str):
        async def admitted(request, context):
            await self._enter(context, method)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.in_flight -= 1

        return admitted

    async def _enter(self, context, method: str) -> None:
        """Count the call in, or refuse it (the abort raises) when the limit is reached."""
        if self.in_flight >= self.limit:
            await self._refuse(context, method)
        self.in_flight += 1

    async def _refuse(self, context, method: str) -> None:
        self.metrics.grpc_refused.labels(method).inc()
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL_S:
            log.warning(
                "overloaded: refused %d call(s) with RESOURCE_EXHAUSTED: %d calls in flight, the limit "
                "(server.max_concurrent_rpcs) is %d",
                self._refused_since_log,
                self.in_flight,
                self.limit,
            )
            self._refused_since_log, self._logged_at = 0, now
        status = rich_status(Overloaded(self.in_flight, self.limit, self.retry_after_ms))
        hint = (RETRY_PUSHBACK_KEY, str(self.retry_after_ms))
        await context.abort(status.code, status.details, trailing_metadata=(hint, *status.trailing_metadata))
