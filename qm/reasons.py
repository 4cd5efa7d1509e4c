"""Why qm-server answered an error: the reason code it attaches to the status.

qm-server puts a google.rpc.ErrorInfo (domain DOMAIN, reason a `Reason`) in the details of
every error status it answers (qm/server/servicer.py, its one error map); the clients
decide on the code and this reason, never on the message text (qm/client/common.py). An
error without a reason came from gRPC itself: qm-server was not reached.

`Reason` mirrors qm.v1.ErrorReason (protos/qm/v1/task_queue.proto documents each): a
str-enum of the value names without their ERROR_REASON_ prefix, as ErrorInfo.reason
carries them, so `error.reason == "BROKER_UNAVAILABLE"` holds.
"""

from __future__ import annotations

import enum

#: ErrorInfo.domain of qm-server's errors (the API package).
DOMAIN = "qm.v1"
#: The prefix of qm.v1.ErrorReason value names.
PROTO_PREFIX = "ERROR_REASON_"


class Reason(enum.StrEnum):
    """qm.v1.ErrorReason by name; each comes with one status code (see the proto)."""

    INVALID_FIELD = "INVALID_FIELD"
    UNKNOWN_TASK_TYPE = "UNKNOWN_TASK_TYPE"
    TASK_NOT_FOUND = "TASK_NOT_FOUND"
    TASK_ALREADY_FINISHED = "TASK_ALREADY_FINISHED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    BROKER_REFUSED = "BROKER_REFUSED"
    CONFIG_CONFLICT = "CONFIG_CONFLICT"
    SERVER_ERROR = "SERVER_ERROR"
    OVERLOADED = "OVERLOADED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RATE_LIMITED = "RATE_LIMITED"
    QUEUE_FULL = "QUEUE_FULL"
    VALIDATORS_BUSY = "VALIDATORS_BUSY"
    STREAM_EXPIRED = "STREAM_EXPIRED"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    NO_WORKER_FITS = "NO_WORKER_FITS"
    GROUP_NOT_FOUND = "GROUP_NOT_FOUND"
    SCHEDULE_NOT_FOUND = "SCHEDULE_NOT_FOUND"


def parse_reason(text: str) -> str | None:
    """ErrorInfo.reason as the client keeps it: a Reason; the text itself for a reason this
    version does not know (a newer server); None for none."""
    if not text:
        return None
    try:
        return Reason(text)
    except ValueError:
        return text
