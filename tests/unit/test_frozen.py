"""evolve / from_values (qm/frozen.py): the same records as dataclasses.replace and __init__."""
from __future__ import annotations

import dataclasses
import time

import pytest

from qm.frozen import evolve, from_values
from qm.messages import TaskEvent
from qm.server.store_api import TaskRecord
from qm.states import TaskState


def record() -> TaskRecord:
    return TaskRecord.queued("t1", "math", "default", "text", time.time(), 60.0, 64, "key", 2)


def test_evolve_makes_what_replace_makes_and_leaves_the_original_alone():
    original = record()
    changes = dict(state=TaskState.SUCCEEDED, attempts=1, result=b"2", finished_at=original.created_at + 1)
    evolved = evolve(original, **changes)
    assert evolved == dataclasses.replace(original, **changes) and type(evolved) is TaskRecord
    assert original.state is TaskState.QUEUED and original.result is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.state = TaskState.FAILED  # type: ignore[misc]
    event = TaskEvent("t1", "math", "default", 1, TaskState.SUCCEEDED, started_at_s=1.0)
    assert evolve(event, state=TaskState.RUNNING, started_at_s=None) == dataclasses.replace(
        event, state=TaskState.RUNNING, started_at_s=None)


def test_a_misspelled_field_is_refused_as_replace_refuses_it():
    with pytest.raises(TypeError, match="'stat'"):
        evolve(record(), stat=TaskState.FAILED)


def test_from_values_builds_the_record_of_its_fields_in_order():
    original = record()
    values = [getattr(original, field.name) for field in dataclasses.fields(TaskRecord)]
    assert from_values(TaskRecord, values) == original
    with pytest.raises(TypeError, match="fields"):
        from_values(TaskRecord, values[:-1])
