"""Progress from inside a task: `qm.progress(fraction, message="", detail=None)`.

    task code ── qm.progress() ──► reporter of this child (qm/worker/progress.py: latest kept,
                                   a thread sends it on the pool pipe; the task never waits)
                                          │
    supervisor: at most 10 a second per task, the latest always kept ──► progress event
    (qm.events) ──► server store (latest per task) ──► GetTaskStatus, StreamTaskResults

Progress is advisory: it is not part of the at-least-once outcome path. An update may be
lost (a crash, RabbitMQ away, the rate limit keeping only the latest); an outcome never
is, and never waits for one. A late update never overwrites a terminal state.

Outside a worker's child (a plain script, a unit test) there is nobody to tell: a call
validates its input and is a no-op (logged at debug level). `qm run` runs the task in a
child of its own and prints each update to stderr.

(The module is not named `qm.progress`: importing it would put the module where the
function `qm.progress` is.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from typing import Any, Protocol

__all__ = ["DETAIL_MAX_BYTES", "MESSAGE_MAX_CHARS", "Progress", "progress"]

log = logging.getLogger(__name__)

#: Longest progress message kept; a longer one is cut to this many characters.
MESSAGE_MAX_CHARS = 200
#: Largest detail, as compact UTF-8 JSON; a larger one is refused (ValueError).
DETAIL_MAX_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report: how far (0..1), a message, an optional JSON detail (encoded)."""

    fraction: float
    message: str = ""
    detail_json: str = ""


class Reporter(Protocol):
    """Where a child's reports go (qm/worker/progress.py ChildReporter)."""

    def report(self, update: Progress) -> None: ...


_lock = threading.Lock()
#: The reporter of the task running in this process, if any. A process-wide slot, not a
#: context variable: threads the task starts report for it too.
_reporter: Reporter | None = None


def install(reporter: Reporter | None) -> None:
    """Set (or, with None, clear) where qm.progress() reports go. The pool child does this."""
    global _reporter
    with _lock:
        _reporter = reporter


def progress(fraction: float, message: str = "", detail: Any = None) -> None:
    """Report how far the running task got: `fraction` from 0 to 1, a short `message`
    (cut to MESSAGE_MAX_CHARS), and an optional `detail` that JSON can encode, at most
    DETAIL_MAX_BYTES encoded. Never blocks: the latest report wins, at most 10 a second
    reach the server. Raises TypeError/ValueError for bad input, wherever it runs."""
    update = make(fraction, message, detail)
    reporter = _reporter
    if reporter is None:
        log.debug("qm.progress(%g) outside a worker's task: nobody to tell", update.fraction)
        return
    reporter.report(update)


def make(fraction: float, message: str = "", detail: Any = None) -> Progress:
    """A validated Progress, or TypeError/ValueError naming the argument."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"qm.progress: fraction must be a number from 0 to 1, got {type(fraction).__name__}")
    if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"qm.progress: fraction must be from 0 to 1, got {fraction!r}")
    if not isinstance(message, str):
        raise TypeError(f"qm.progress: message must be a str, got {type(message).__name__}")
    detail_json = ""
    if detail is not None:
        try:
            detail_json = json.dumps(detail, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"qm.progress: detail must be JSON-encodable: {exc}") from None
        size_bytes = len(detail_json.encode())
        if size_bytes > DETAIL_MAX_BYTES:
            raise ValueError(
                f"qm.progress: detail is {size_bytes} bytes as JSON, over the "
                f"{DETAIL_MAX_BYTES}-byte limit; send a summary, return the rest as the result"
            )
    return Progress(float(fraction), message[:MESSAGE_MAX_CHARS], detail_json)
