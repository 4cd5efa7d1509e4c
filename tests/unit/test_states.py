"""Task lifecycle ordering: duplicate and late events must not move a task backwards."""
from __future__ import annotations

import json
import sqlite3

import pytest

from qm._proto.qm.v1 import task_queue_pb2
from qm.states import TERMINAL_STATES, TaskState, state_name, supersedes

S = TaskState
NON_TERMINAL = [S.QUEUED, S.RUNNING, S.RETRYING]


def test_terminal_property_matches_lifecycle():
    assert {state for state in TaskState if state.terminal} == set(TERMINAL_STATES)
    assert {S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.MEMORY_EXCEEDED, S.CRASHED, S.CANCELLED} == TERMINAL_STATES
    assert not any(state.terminal for state in NON_TERMINAL)


@pytest.mark.parametrize("current", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("new", list(TaskState))
@pytest.mark.parametrize("new_attempt", [1, 2])
def test_terminal_state_is_final(current, new, new_attempt):
    """Nothing replaces a terminal state: not a late RUNNING, not a second terminal,
    not even an event of a later attempt."""
    assert supersedes(current, 1, new, new_attempt) is False


@pytest.mark.parametrize("current, current_attempt, new, new_attempt, expected", [
    # within one attempt a state only moves forward
    (S.QUEUED, 0, S.RUNNING, 1, True),       # first attempt starts
    (S.QUEUED, 1, S.RUNNING, 1, True),
    (S.RUNNING, 1, S.SUCCEEDED, 1, True),
    (S.RUNNING, 1, S.FAILED, 1, True),
    (S.RUNNING, 1, S.RETRYING, 1, True),
    (S.QUEUED, 1, S.SUCCEEDED, 1, True),     # RUNNING event lost or late: terminal still applies
    (S.RUNNING, 1, S.RUNNING, 1, False),     # duplicate delivery of the same event
    (S.QUEUED, 0, S.QUEUED, 0, False),
    (S.RUNNING, 1, S.QUEUED, 1, False),      # backwards
    (S.RETRYING, 1, S.RUNNING, 1, False),    # backwards within the attempt
    # a later attempt wins, an earlier one loses
    (S.RETRYING, 1, S.RUNNING, 2, True),
    (S.RETRYING, 1, S.QUEUED, 2, True),
    (S.RUNNING, 2, S.RUNNING, 1, False),     # late event of the previous attempt
    (S.RUNNING, 2, S.RETRYING, 1, False),
    (S.RETRYING, 2, S.RUNNING, 1, False),
])
def test_supersedes(current, current_attempt, new, new_attempt, expected):
    assert supersedes(current, current_attempt, new, new_attempt) is expected


def test_state_names_users_see_drop_the_proto_prefix():
    assert [state_name(state) for state in TaskState] == [state.name for state in TaskState]
    assert state_name(TaskState.MEMORY_EXCEEDED) == "MEMORY_EXCEEDED"
    assert state_name(0) == "UNSPECIFIED"


def test_a_state_reads_as_its_name_and_travels_as_its_wire_number():
    """Users see names (`status.state == "SUCCEEDED"`, JSON, printing); protos and the
    store see the qm.v1.TaskState number."""
    assert S.SUCCEEDED == "SUCCEEDED" and "CANCELLED" in TERMINAL_STATES
    assert f"{S.TIMED_OUT} {S.QUEUED:<8}|" == "TIMED_OUT QUEUED  |"
    assert json.dumps({"state": S.CRASHED}) == '{"state": "CRASHED"}'
    for state in TaskState:
        number = task_queue_pb2.TaskState.Value(f"TASK_STATE_{state.name}")
        assert int(state) == number
        assert TaskState.of_number(number) is state and TaskState(number) is state
    for not_a_state in (0, 99):  # UNSPECIFIED, or a state newer than this code
        with pytest.raises(ValueError, match=str(not_a_state)):
            TaskState.of_number(not_a_state)
    with pytest.raises(ValueError):
        TaskState(True)  # a bool is not a wire number


def test_sqlite_stores_a_state_as_its_number():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE tasks (state INTEGER NOT NULL)")
    db.execute("INSERT INTO tasks VALUES (?)", (S.RETRYING,))
    assert db.execute("SELECT state, typeof(state) FROM tasks").fetchone() == (int(S.RETRYING), "integer")
