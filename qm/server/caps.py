"""Server-wide caps on what one submission may ask for (issue 12, item 3).

* Queues: a submission names a logical queue; only the configured ones are accepted
  (`server.queues`, default `default`). Each entry is a name or a glob pattern (`*` stands
  for any run of name characters, so `*` alone allows every valid name). The name must
  pass the one queue-name rule first (`topology.queue_name_problem`, a full match: a
  trailing newline is refused); an unknown queue is INVALID_ARGUMENT and never becomes
  a RabbitMQ queue (the server declares a work queue only after this check).
* Limits: a submitted timeout, memory limit or retry count above the server's maximum
  (`server.max_task_timeout_s`, `server.max_task_memory_limit_mb`, `server.max_retries`)
  is refused naming the field and the key; defaults above them (a task type's, the
  server's) are brought down to them, and with a memory maximum set, "no limit" becomes
  that maximum. 0 for the memory maximum = no server-wide cap.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Sequence

from qm.broker import topology
from qm.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class SubmitCaps:
    """The caps; the defaults allow every valid queue and cap nothing (unit tests, embedded use)."""

    queues: Sequence[str] = ("*",)
    max_timeout_s: float = 0.0  # 0 = no cap
    max_memory_limit_mb: int = 0  # 0 = no cap
    max_retries: int = 0  # 0 = no cap
    _patterns: tuple[re.Pattern[str], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patterns", tuple(re.compile(fnmatch.translate(q)) for q in self.queues))

    def check_queue(self, queue: str) -> None:
        """ValidationError("queue", ...) unless `queue` is a valid name this server accepts."""
        problem = topology.queue_name_problem(queue)
        if problem:
            raise ValidationError("queue", problem)
        if not any(pattern.fullmatch(queue) for pattern in self._patterns):
            raise ValidationError(
                "queue", f"unknown queue {queue!r}; this server accepts {', '.join(self.queues)} (server.queues)"
            )

    def check_requested(self, timeout_s: float, memory_limit_mb: int, retry_options: dict[str, Any]) -> None:
        """Refuse a submitted value above a server maximum (0 / None = not submitted)."""
        if self.max_timeout_s and timeout_s > self.max_timeout_s:
            raise ValidationError(
                "timeout_s",
                f"{timeout_s:g} s exceeds the server's maximum of {self.max_timeout_s:g} s (server.max_task_timeout_s)",
            )
        if self.max_memory_limit_mb and memory_limit_mb > self.max_memory_limit_mb:
            raise ValidationError(
                "memory_limit_mb",
                f"{memory_limit_mb} MB exceeds the server's maximum of "
                f"{self.max_memory_limit_mb} MB (server.max_task_memory_limit_mb)",
            )
        retries = retry_options.get("max_retries")
        if self.max_retries and retries is not None and retries > self.max_retries:
            raise ValidationError(
                "max_retries", f"{retries} exceeds the server's maximum of {self.max_retries} (server.max_retries)"
            )

    def timeout_s(self, resolved_s: float) -> float:
        return min(resolved_s, self.max_timeout_s) if self.max_timeout_s else resolved_s

    def memory_limit_mb(self, resolved_mb: int) -> int:
        """The resolved limit brought down to the maximum; no limit (0) becomes the maximum."""
        if not self.max_memory_limit_mb:
            return resolved_mb
        return min(resolved_mb, self.max_memory_limit_mb) if resolved_mb else self.max_memory_limit_mb

    def retries(self, resolved: int) -> int:
        return min(resolved, self.max_retries) if self.max_retries else resolved
