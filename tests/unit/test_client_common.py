"""The pieces qm.Client and qm.aio.Client share (qm/client/common.py), on a fake clock:
failover and backoff, the resume of a wait, batches."""
from __future__ import annotations

import uuid

import grpc
import pytest

from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import (
    RETRY_INITIAL_DELAY_S,
    RETRY_MAX_DELAY_S,
    SUBMIT_RETRY_CODES,
    Attempts,
    Batch,
    Failover,
    Follow,
    RemoteError,
    batch_requests,
    error_reason,
    parse_servers,
    stream_error,
    stream_ids_limit,
    submit_request,
)
from qm.errors import BatchError, BrokerUnavailable, StreamIdsOverLimit, ValidationError, WaitTimeout
from qm.reasons import Reason
from qm.server.servicer import rich_status

UNAVAILABLE, OK, INVALID = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_server_addresses_are_one_or_several():
    assert parse_servers("a:1") == ["a:1"]
    assert parse_servers(" a:1, b:2 ,a:1") == ["a:1", "b:2"]
    assert parse_servers(["a:1", "[::1]:3"]) == ["a:1", "[::1]:3"]
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_servers("a:1,b")
    with pytest.raises(ValueError, match="no qm-server address"):
        parse_servers(" , ")


# -- failover and backoff ------------------------------------------------------------------

def test_a_call_tries_each_address_once_then_fails_naming_them_all():
    failover = Failover(["a:1", "b:2"])
    attempts = Attempts(failover, 0.0, Clock())
    assert attempts.address == "a:1"
    assert attempts.failed("a:1", UNAVAILABLE, "refused") == 0.0  # on to b at once
    assert attempts.address == "b:2"
    with pytest.raises(RemoteError) as caught:
        attempts.failed("b:2", UNAVAILABLE, "refused")
    assert caught.value.code is UNAVAILABLE and "a:1, b:2" in str(caught.value)


def test_later_calls_start_at_the_address_that_answered():
    failover = Failover(["a:1", "b:2"])
    Attempts(failover, 0.0, Clock()).failed("a:1", UNAVAILABLE, "down")
    assert Attempts(failover, 0.0, Clock()).address == "b:2"


def test_an_error_other_than_unavailable_is_not_retried_anywhere():
    failover = Failover(["a:1", "b:2"])
    with pytest.raises(RemoteError) as caught:
        Attempts(failover, 60.0, Clock()).failed("a:1", grpc.StatusCode.FAILED_PRECONDITION, "key reused")
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION and str(caught.value) == "key reused"
    assert failover.current == "a:1"


def test_rounds_back_off_doubling_to_the_cap_within_the_window():
    clock = Clock()
    attempts = Attempts(Failover(["a:1"]), 10.0, clock)
    delays = []
    with pytest.raises(RemoteError, match="tried for 10 s"):
        while True:
            delay = attempts.failed("a:1", UNAVAILABLE, "down")
            delays.append(delay)
            clock.now += delay
    assert delays[:4] == [RETRY_INITIAL_DELAY_S, 2 * RETRY_INITIAL_DELAY_S, 4 * RETRY_INITIAL_DELAY_S,
                          8 * RETRY_INITIAL_DELAY_S]
    assert max(delays) == RETRY_MAX_DELAY_S and sum(delays) <= 10.0


# -- the resume of a wait -----------------------------------------------------------------

def status(task_id: str, state: int, attempts: int = 1, at_s: int = 1) -> task_queue_pb2.TaskStatus:
    proto = task_queue_pb2.TaskStatus(task_id=task_id, state=state, attempts=attempts, codec="text",
                                      result=b"ok" if state == task_queue_pb2.TASK_STATE_SUCCEEDED else b"")
    proto.updated_at.FromSeconds(at_s)
    return proto


RUNNING, SUCCEEDED = task_queue_pb2.TASK_STATE_RUNNING, task_queue_pb2.TASK_STATE_SUCCEEDED


def test_a_resumed_stream_delivers_no_state_twice_and_asks_only_for_open_tasks():
    clock = Clock()
    follow = Follow(["t1", "t2", "t1"], Failover(["a:1"]), None, 60.0, clock)
    assert [r.task_ids for r in follow.requests()] == [["t1", "t2"]]
    assert follow.accept(status("t1", RUNNING)).state == "RUNNING"
    assert follow.accept(status("t2", RUNNING)).state == "RUNNING"
    assert follow.accept(status("t2", SUCCEEDED, at_s=2)).result == "ok"

    delay = follow.interrupted("a:1", UNAVAILABLE, "Socket closed")  # the server was killed
    assert delay > 0 and follow.resumed == 1
    assert [r.task_ids for r in follow.requests()] == [["t1"]]
    assert follow.accept(status("t1", RUNNING)) is None            # the current state, already seen
    assert follow.accept(status("t2", SUCCEEDED, at_s=2)) is None  # finished, delivered
    assert follow.accept(status("t1", SUCCEEDED, at_s=3)).state == "SUCCEEDED"
    assert follow.done


def test_a_wait_over_more_ids_than_a_stream_may_follow_takes_one_stream_after_another():
    follow = Follow(["t1", "t2", "t3", "t4", "t5"], Failover(["a:1"]), None, 60.0, Clock(), stream_ids=2)
    assert [r.task_ids for r in follow.requests()] == [["t1", "t2"]]
    follow.accept(status("t1", SUCCEEDED))
    assert not follow.window_done                              # t2 still runs on this stream
    follow.accept(status("t2", SUCCEEDED))
    assert follow.window_done                                  # the stream ends cleanly: the next ids
    assert [r.task_ids for r in follow.requests()] == [["t3", "t4"]]
    follow.accept(status("t4", SUCCEEDED))
    follow.interrupted("a:1", UNAVAILABLE, "Socket closed")      # resumed: t3 first, then the next one
    assert [r.task_ids for r in follow.requests()] == [["t3", "t5"]]
    follow.accept(status("t3", SUCCEEDED))
    follow.accept(status("t5", SUCCEEDED))
    assert follow.done and not follow.window_done


def test_a_server_with_a_lower_stream_limit_makes_the_wait_follow_that_many_a_stream():
    follow = Follow(["t1", "t2", "t3", "t4", "t5"], Failover(["a:1"]), None, 60.0, Clock(), stream_ids=4)
    assert [r.task_ids for r in follow.requests()] == [["t1", "t2", "t3", "t4"]]
    follow.accept(status("t1", SUCCEEDED))  # sent before the server counted past its limit
    delay = follow.interrupted("a:1", INVALID, "5 task ids sent on one stream, over the limit of 2",
                               reason="INVALID_FIELD", limit=2)
    assert delay == 0.0 and follow.stream_ids == 2  # at once, in windows of the server's size
    assert [r.task_ids for r in follow.requests()] == [["t2", "t3"]]
    with pytest.raises(RemoteError, match="over the limit of 2"):  # the same limit again: no loop
        follow.interrupted("a:1", INVALID, "over the limit of 2", reason="INVALID_FIELD", limit=2)


def test_the_stream_limit_a_server_names_is_what_a_client_reads():
    refused = CallError(rich_status(StreamIdsOverLimit(10_001, 10_000)))
    assert stream_error(refused) == (INVALID, str(StreamIdsOverLimit(10_001, 10_000)), "INVALID_FIELD", 10_000)
    other_field = CallError(rich_status(ValidationError("task_ids", "empty")))
    assert stream_ids_limit(other_field) is None


def test_a_stream_follows_at_least_one_id():
    with pytest.raises(ValueError, match="stream_ids"):
        Follow(["t1"], Failover(["a:1"]), None, 60.0, Clock(), stream_ids=0)


def test_a_stream_ended_at_its_lifetime_is_opened_again_however_long_it_was_quiet():
    clock = Clock()
    follow = Follow(["t1"], Failover(["a:1"]), None, 60.0, clock, final_only=True)
    follow.accept(status("t1", RUNNING))
    clock.now += 3600.0  # final states only: nothing came for the stream's whole hour
    delay = follow.interrupted("a:1", UNAVAILABLE, "open for 3600 s", reason="STREAM_EXPIRED")
    assert 0 <= delay < 5 and follow.resumed == 1
    clock.now += 3600.0
    assert follow.interrupted("a:1", UNAVAILABLE, "open for 3600 s", reason="STREAM_EXPIRED") < 5
    with pytest.raises(RemoteError, match="tried for 60 s"):  # a server really gone still ends the wait
        clock.now += 61.0
        follow.interrupted("a:1", UNAVAILABLE, "Socket closed")


def test_before_any_server_answered_a_wait_fails_after_one_round():
    follow = Follow(["t1"], Failover(["a:1", "b:2"]), None, 60.0, Clock())
    assert follow.interrupted("a:1", UNAVAILABLE, "refused") == 0.0
    with pytest.raises(RemoteError, match="a:1, b:2"):
        follow.interrupted("b:2", UNAVAILABLE, "refused")


def test_once_connected_a_wait_rides_out_reconnect_s_without_a_server():
    clock = Clock()
    follow = Follow(["t1"], Failover(["a:1"]), None, 5.0, clock)
    follow.accept(status("t1", RUNNING))
    waited = 0.0
    with pytest.raises(RemoteError, match="tried for 5 s"):
        while True:
            delay = follow.interrupted("a:1", UNAVAILABLE, "refused")
            clock.now += delay
            waited += delay
    assert 4.0 <= waited <= 5.0
    follow.accept(status("t1", RUNNING, at_s=9))  # an answer opens the window again
    assert follow.interrupted("a:1", UNAVAILABLE, "refused") == RETRY_INITIAL_DELAY_S


def test_the_callers_deadline_bounds_the_wait_and_names_the_open_tasks():
    clock = Clock()
    follow = Follow(["t1", "t2"], Failover(["a:1"]), 3.0, 60.0, clock)
    follow.accept(status("t1", SUCCEEDED))
    assert follow.call_timeout() == 3.0
    with pytest.raises(WaitTimeout) as caught:
        follow.interrupted("a:1", grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert caught.value.task_ids == ["t2"] and isinstance(caught.value, TimeoutError)
    clock.now += 3.0
    with pytest.raises(WaitTimeout, match="t2 not finished within 3 s"):
        follow.call_timeout()


def test_an_unknown_task_ends_the_wait():
    follow = Follow(["t1"], Failover(["a:1"]), None, 60.0, Clock())
    follow.accept(status("t1", RUNNING))
    with pytest.raises(RemoteError) as caught:
        follow.interrupted("a:1", grpc.StatusCode.NOT_FOUND, "no task with id 't1'")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_many_ids_are_asked_for_in_several_messages():
    follow = Follow([f"t{i}" for i in range(2500)], Failover(["a:1"]), None, 60.0, Clock())
    assert [len(r.task_ids) for r in follow.requests()] == [1000, 1000, 500]


# -- batches ------------------------------------------------------------------------------

def test_batch_items_take_the_batch_options_their_own_and_keys_from_a_batch_key():
    requests = batch_requests([("math", "1"), ("math", "2", {"queue": "q2", "idempotency_key": "own"}),
                               ("test.echo", {"a": 1})],
                              {"queue": "q", "max_retries": 2, "idempotency_key": "K"})
    assert [(r.type, r.payload, r.queue, r.max_retries, r.idempotency_key) for r in requests] == [
        ("math", b"1", "q", 2, "K/0"), ("math", b"2", "q2", 2, "own"),
        ("test.echo", b'{"a": 1}', "q", 2, "K/2")]
    fresh = batch_requests([("math", "1"), ("math", "1")], {})
    assert fresh[0].idempotency_key and fresh[0].idempotency_key != fresh[1].idempotency_key
    # keys the client makes grow with time, so they land on the right of the store's key index
    assert {uuid.UUID(r.idempotency_key).version for r in fresh} == {7}
    with pytest.raises(TypeError, match="unexpected options: colour"):
        batch_requests([("math", "1")], {"colour": "red"})
    with pytest.raises(TypeError, match="item 0"):
        batch_requests(["math"], {})


def test_batches_are_cut_by_count_and_by_size():
    small = Batch([submit_request("math", "1")] * 7, max_items=3)
    assert list(small.chunks()) == [[0, 1, 2], [3, 4, 5], [6]]
    big = Batch([submit_request("test.echo", "x" * 1000)] * 5, max_items=100, max_bytes=2500)
    assert list(big.chunks()) == [[0, 1], [2, 3], [4]]


def results(*outcomes) -> task_queue_pb2.SubmitTasksResponse:
    response = task_queue_pb2.SubmitTasksResponse()
    for outcome in outcomes:
        if isinstance(outcome, str):
            response.results.add(task_id=outcome, state=task_queue_pb2.TASK_STATE_QUEUED)
        else:
            response.results.add(code=outcome[0].value[0], message=outcome[1])
    return response


def test_refused_items_are_named_and_the_accepted_ids_are_on_the_error():
    batch = Batch([submit_request("math", "1"), submit_request("math", "1 +"), submit_request("nope", "x"),
                   submit_request("math", "2")])
    again = batch.record([0, 1, 2, 3], results("id0", (grpc.StatusCode.INVALID_ARGUMENT, "payload: bad"),
                                                (UNAVAILABLE, "RabbitMQ is unreachable"), "id3"))
    assert again == [2]  # the broker was away: sent again, same key
    again = batch.record([2], results((grpc.StatusCode.INVALID_ARGUMENT, "type: unknown task type 'nope'")))
    assert again == []
    with pytest.raises(BatchError) as caught:
        batch.task_ids_or_raise()
    error = caught.value
    assert error.task_ids == ["id0", None, None, "id3"] and error.accepted_ids == ["id0", "id3"]
    assert [(item.index, item.type, item.code) for item in error.refused] == \
        [(1, "math", "INVALID_ARGUMENT"), (2, "nope", "INVALID_ARGUMENT")]
    assert "2 of 4 items refused" in str(error)
    assert "item 1 (math): INVALID_ARGUMENT payload: bad" in str(error)


def test_a_batch_cut_off_names_the_items_not_answered():
    batch = Batch([submit_request("math", "1")] * 3, max_items=1)
    batch.record([0], results("id0"))
    batch.give_up(RemoteError(UNAVAILABLE, "Socket closed", "a:1"))
    with pytest.raises(BatchError) as caught:
        batch.task_ids_or_raise()
    assert caught.value.task_ids == ["id0", None, None]
    assert {item.code for item in caught.value.refused} == {"UNAVAILABLE"}
    nothing = Batch([submit_request("math", "1")])
    with pytest.raises(RemoteError):  # nothing accepted: the call's own error
        nothing.give_up(RemoteError(UNAVAILABLE, "Socket closed", "a:1"))


def test_a_client_that_has_reached_a_server_rides_out_its_absence_from_the_start_of_a_wait():
    failover = Failover(["a:1"])
    Attempts(failover, 0.0, Clock()).reached()  # e.g. the submit before result()
    follow = Follow(["t1"], failover, None, 60.0, Clock())
    assert follow.interrupted("a:1", UNAVAILABLE, "refused") == RETRY_INITIAL_DELAY_S


def test_a_submit_carries_every_option_and_always_a_key():
    request = submit_request("math", "1", queue="q", timeout_s=2.0, soft_timeout_s=0.5, memory_limit_mb=64,
                             max_retries=0, retry_jitter=False)
    assert (request.queue, request.timeout_s, request.soft_timeout_s, request.memory_limit_mb) == \
        ("q", 2.0, 0.5, 64)
    assert request.HasField("max_retries") and request.max_retries == 0
    assert not request.HasField("retry_backoff_s")
    assert request.HasField("retry_jitter") and request.idempotency_key


def test_a_submit_retries_an_overloaded_server_after_its_hint():
    clock = Clock()
    attempts = Attempts(Failover(["a:1"]), 30.0, clock, retry_codes=SUBMIT_RETRY_CODES)
    assert attempts.failed("a:1", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", 0.05) == 0.05
    assert attempts.failed("a:1", grpc.StatusCode.CANCELLED, "") > 0
    with pytest.raises(RemoteError) as caught:
        attempts.failed("a:1", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", 60.0)
    assert caught.value.retry_after_s == 60.0


# -- reason codes --------------------------------------------------------------------------

class CallError(grpc.RpcError):
    """A failed call as grpc raises it: code, details, trailing metadata (the public Call
    methods error_reason reads)."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def test_the_reason_a_server_sends_is_the_reason_a_client_reads():
    broker_down = CallError(rich_status(BrokerUnavailable("RabbitMQ at 127.0.0.1:5672 is unreachable")))
    assert error_reason(broker_down) is Reason.BROKER_UNAVAILABLE
    bad_queue = rich_status(ValidationError("queue", "not 1-100 of letters"))
    assert error_reason(CallError(bad_queue)) == "INVALID_FIELD"
    no_server = grpc.Status()  # what gRPC raises without reaching anyone: no details trailer
    no_server.code, no_server.details, no_server.trailing_metadata = UNAVAILABLE, "connection refused", ()
    assert error_reason(CallError(no_server)) is None


def test_unavailable_is_worded_by_the_servers_reason_never_by_its_text():
    broker = RemoteError(UNAVAILABLE, "RabbitMQ at r:5672 is unreachable", "a:1",
                         reason=Reason.BROKER_UNAVAILABLE)
    assert str(broker) == "RabbitMQ at r:5672 is unreachable" and broker.reason == "BROKER_UNAVAILABLE"
    # a proxy's or gRPC's own words that happen to name a broker: still qm-server not reached
    unreached = RemoteError(UNAVAILABLE, "upstream broker connect error", "a:1")
    assert str(unreached).startswith("cannot reach qm-server at a:1") and unreached.reason is None


def test_a_batch_item_refused_for_the_broker_is_sent_again_and_keeps_its_reason():
    batch = Batch(batch_requests([("math", "1"), ("math", "2")], {}))
    response = task_queue_pb2.SubmitTasksResponse()
    response.results.add(task_id="t0")
    response.results.add(code=UNAVAILABLE.value[0], message="RabbitMQ did not confirm", reason="BROKER_UNAVAILABLE")
    assert batch.record([0, 1], response) == [1]
    assert batch.refused[1].reason is Reason.BROKER_UNAVAILABLE


def test_a_stream_response_gives_its_batched_statuses_or_else_its_one_status():
    from qm.client.common import response_statuses

    one, two = task_queue_pb2.TaskStatus(task_id="a"), task_queue_pb2.TaskStatus(task_id="b")
    old_server = task_queue_pb2.StreamTaskResultsResponse(status=one)  # a server older than `batched`
    batched = task_queue_pb2.StreamTaskResultsResponse(statuses=[one, two])
    assert [status.task_id for status in response_statuses(old_server)] == ["a"]
    assert [status.task_id for status in response_statuses(batched)] == ["a", "b"]
    assert all(request.batched for request in Follow(["a"], Failover(["x:1"]), None, 1.0).requests())
