"""Wire format of task messages and task events."""
from __future__ import annotations

import dataclasses

import pytest

from qm.messages import TaskEvent, TaskMessage, pack_events
from qm.retry import RetryPolicy
from qm.states import TaskState


def test_task_message_round_trip():
    message = TaskMessage("id-1", "math", b"\x00\xff1 + 2", "high", attempt=3, enqueued_at_s=1_700_000_000.25)
    decoded = TaskMessage.decode(message.encode())
    assert decoded.enqueued_at_s == pytest.approx(message.enqueued_at_s, abs=1e-6)  # nanoseconds on the wire
    assert dataclasses.replace(decoded, enqueued_at_s=message.enqueued_at_s) == message


def test_task_message_headers_name_the_task():
    message = TaskMessage("id-1", "math", b"1", "default", attempt=2)
    assert message.headers() == {"qm-task-id": "id-1", "qm-type": "math", "qm-attempt": 2}


def test_task_message_attempt_defaults_to_one_on_the_wire():
    decoded = TaskMessage.decode(TaskMessage("id-1", "math", b"1", "default", attempt=0).encode())
    assert decoded.attempt == 1


@pytest.mark.parametrize("state", list(TaskState))
def test_task_event_round_trip(state):
    event = TaskEvent("id-1", "math", "default", 2, state, "w1", b"11", "boom", 1_700_000_000.123)
    decoded = TaskEvent.decode(event.encode())
    assert decoded.at_s == pytest.approx(event.at_s, abs=1e-6)
    assert dataclasses.replace(decoded, at_s=event.at_s) == event
    assert decoded.state is state
    assert decoded.started_at_s is None  # only an outcome of an unannounced run has one


def test_an_outcome_keeps_the_start_it_carries():
    event = TaskEvent("id-1", "math", "default", 1, TaskState.SUCCEEDED, "w1", b"11", at_s=1_700_000_001.5,
                      timeout_s=30.0, started_at_s=1_700_000_001.25)
    decoded = TaskEvent.decode(event.encode())
    assert decoded.started_at_s == pytest.approx(1_700_000_001.25, abs=1e-6)
    assert (decoded.state, decoded.timeout_s) == (TaskState.SUCCEEDED, 30.0)


#: Bodies encoded by the release before the protos were laid out by package (issue 19:
#: TaskState values renamed TASK_STATE_*, numbers kept): a rolling upgrade finds such
#: messages waiting in RabbitMQ.
BEFORE_RELAYOUT_EVENT = bytes.fromhex(
    "0a03742d3112046d6174681a0764656661756c74200228063a0d6b696c6c6564206174203520734203772d314a0c0880e2cfaa06"
    "1080cab5ee01510000000000001440")
BEFORE_RELAYOUT_MESSAGE = bytes.fromhex(
    "0a03742d3112046d6174681a0931202b2032202a2035220764656661756c74280132060880e2cfaa06390000000000003e4040"
    "80024a16080311000000000000f03f190000000000004e402001")


def test_messages_queued_by_the_previous_release_still_decode():
    assert TaskEvent.decode(BEFORE_RELAYOUT_EVENT) == TaskEvent(
        "t-1", "math", "default", 2, TaskState.TIMED_OUT, worker="w-1", error="killed at 5 s",
        at_s=1_700_000_000.5, timeout_s=5.0)
    assert TaskMessage.decode(BEFORE_RELAYOUT_MESSAGE) == TaskMessage(
        "t-1", "math", b"1 + 2 * 5", "default", 1, 1_700_000_000.0, 30.0, 256, RetryPolicy(3, 1.0, 60.0, True, False))


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff", b"\x0a\x05ab"])
def test_undecodable_bodies_raise_value_error(body):
    with pytest.raises(ValueError, match="undecodable"):
        TaskMessage.decode(body)
    with pytest.raises(ValueError, match="undecodable"):
        TaskEvent.decode(body)


def test_messages_without_ids_are_rejected():
    with pytest.raises(ValueError, match="task_id"):
        TaskMessage.decode(TaskMessage("", "math", b"1", "default").encode())
    with pytest.raises(ValueError, match="task_id"):
        TaskMessage.decode(TaskMessage("id", "", b"1", "default").encode())
    with pytest.raises(ValueError, match="task_id"):
        TaskEvent.decode(TaskEvent("", "math", "default", 1, TaskState.RUNNING).encode())
    with pytest.raises(ValueError):
        TaskMessage.decode(b"")


def test_a_pack_of_events_decodes_to_each_event_in_order():
    first = TaskEvent("t1", "math", "default", 1, TaskState.SUCCEEDED, "w1", b"11", at_s=1_700_000_000.5)
    second = TaskEvent("t2", "math", "high", 2, TaskState.RETRYING, "w1", error="boom", at_s=1_700_000_001.0,
                       next_attempt_at_s=1_700_000_006.0, started_at_s=1_700_000_000.5)
    assert TaskEvent.decode_all(pack_events([first.to_proto(), second.to_proto()])) == [first, second]
    assert TaskEvent.decode_all(first.encode()) == [first]  # a plain event is a list of one


def test_a_pack_reads_as_an_event_without_task_id_to_a_reader_that_predates_packs():
    """What a server older than packs does with one: it drops it as undecodable, loudly
    (hence worker.pack_events: false until every server is upgraded)."""
    body = pack_events([TaskEvent("t1", "math", "default", 1, TaskState.SUCCEEDED).to_proto()] * 2)
    with pytest.raises(ValueError, match="task_id"):
        TaskEvent.decode(body)
    with pytest.raises(ValueError, match="task_id"):
        TaskEvent.decode_all(pack_events([TaskEvent("", "math", "default", 1, TaskState.RUNNING).to_proto()] * 2))
