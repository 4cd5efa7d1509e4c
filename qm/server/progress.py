"""The rule for progress reports arriving at a store (any TaskStore implementation).

A progress event (TaskEvent with `progress`) is advisory: it only ever sets the four
progress columns, never the state, the attempt, the start count or the timestamps of the
lifecycle. It is applied only while its very attempt is RUNNING and only if it is newer
than the progress stored: a report that comes late — after the outcome (the task is
terminal), after a retry began, or behind a newer report — changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qm.frozen import evolve
from qm.messages import TaskEvent
from qm.states import TaskState

if TYPE_CHECKING:
    from qm.server.store_api import TaskRecord


def next_progress(current: TaskRecord | None, event: TaskEvent) -> TaskRecord | None:
    """The record with the event's progress, or None when the report is to be ignored."""
    update = event.progress
    assert update is not None  # only progress events come here
    if current is None or current.state is not TaskState.RUNNING or event.attempt != current.attempts:
        return None
    if current.progress_at is not None and event.at_s <= current.progress_at:
        return None
    return evolve(
        current,
        progress=update.fraction,
        progress_message=update.message,
        progress_detail_json=update.detail_json,
        progress_at=event.at_s,
    )
