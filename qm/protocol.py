"""The names qm-server and qm-worker share on RabbitMQ, in one place: AMQP headers and the
control commands of the `qm.cancels` stream. Message bodies are protobuf (qm/messages.py).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Header:
    """AMQP header names (values are strings or ints)."""

    TASK_ID = "qm-task-id"
    TYPE = "qm-type"
    ATTEMPT = "qm-attempt"
    #: The state a message's task ended in (events, dead letters).
    STATE = "qm-state"
    #: The error text of a dead letter (at most DEAD_ERROR_MAX_CHARS).
    ERROR = "qm-error"
    #: Why a message was dead-lettered; absent when RabbitMQ did it (then: x-death).
    DEAD_REASON = "qm-dead-reason"
    #: A control message's command (Command) and its detail.
    COMMAND = "qm-command"
    DETAIL = "qm-detail"
    #: The worker id of a heartbeat.
    WORKER = "qm-worker"
    #: A work-queue message holding several tasks (messages.TaskBundle): how many.
    BUNDLE = "qm-bundle"
    #: A bundle's origin: the store its tasks are in (a server's id, or a shared store's),
    #: whose servers alone publish its tasks again if a worker rejects it.
    ORIGIN = "qm-origin"
    #: A task published again for a run that may have killed its worker (a member of a
    #: redelivered bundle, or one cut short): it runs alone, like a redelivered message.
    SUSPECT = "qm-suspect"


class Feature:
    """What a worker names in its heartbeat's `features`: messages it can read beyond a
    task a message. Servers send one only once every worker of a queue names it."""

    BUNDLES = "bundles"


#: Longest error text carried in a dead letter's header.
DEAD_ERROR_MAX_CHARS = 2000


class Command(str, enum.Enum):
    """What a message on the control stream asks of every worker."""

    CANCEL = "cancel"  # body: task id; drop it if it waits, kill it if it runs
    POISON = "poison"  # body: task id, detail: starts counted; dead-letter it when it comes
    MARKER = "marker"  # body: a worker's own marker; reading it back = caught up


@dataclasses.dataclass(frozen=True)
class Control:
    """One message of the control stream."""

    command: Command
    subject: str  # a task id, or a marker
    detail: str = ""

    def encode(self) -> tuple[bytes, dict[str, Any]]:
        """(body, headers) to publish."""
        return self.subject.encode(), {Header.COMMAND: self.command.value, Header.DETAIL: self.detail}

    @classmethod
    def decode(cls, body: bytes, headers: dict[str, Any]) -> Control | None:
        """The control message, or None for a command this version does not know."""
        try:
            command = Command(headers.get(Header.COMMAND))
        except ValueError:
            return None
        return cls(command, body.decode(errors="replace"), str(headers.get(Header.DETAIL, "")))


def dead_letter_headers(task_headers: dict[str, Any], reason: str, state_name: str, error: str) -> dict[str, Any]:
    """Headers of a task message sent to qm.dead: why, in which state, with what error."""
    return {
        **task_headers,
        Header.DEAD_REASON: reason,
        Header.STATE: state_name,
        Header.ERROR: error[:DEAD_ERROR_MAX_CHARS],
    }
