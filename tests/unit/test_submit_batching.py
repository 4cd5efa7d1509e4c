"""qm.aio.Client's submits of one loop turn, and the submits of threads sharing a
qm.Client, go out as one SubmitTasks call (qm/client/submit_batching.py): one try each,
whose outcome is what a lone submit's call would have met. A fake server here: what it was sent, and what it answers."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import SUBMIT_RETRY_CODES, Attempts, Failover, RemoteError, submit_request
from qm.client.submit_batching import ALONE, Failed, SubmitBatcher, ThreadSubmitBatcher
from tests.unit.aio import TIMEOUT_S, run


class CallFailed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, retry_after_ms: int | None = None):
        self._code = code
        self._trailing = () if retry_after_ms is None else (("retry-pushback-ms", str(retry_after_ms)),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"scripted {self._code.name}"

    def trailing_metadata(self):
        return self._trailing


def answer(request, refuse: dict) -> task_queue_pb2.SubmitTasksResponse:
    """Every item accepted as `id-<payload>`, unless `refuse` names its payload (once)."""
    response = task_queue_pb2.SubmitTasksResponse()
    for item in request.items:
        payload = item.payload.decode()
        if payload in refuse:
            code, message, reason = refuse.pop(payload)
            response.results.add(code=code.value[0], message=message, reason=reason)
        else:
            response.results.add(task_id=f"id-{payload}", state=task_queue_pb2.TASK_STATE_QUEUED)
    return response


class FakeServer:
    """The asyncio client's SubmitTasks tries: answers as `answer`, or fails whole."""

    def __init__(self, refuse=None, fail_batches: CallFailed | None = None):
        self.refuse = refuse or {}
        self.fail_batches = fail_batches
        self.batches: list[list[str]] = []  # payloads of each SubmitTasks call

    async def try_batch(self, request, address):
        await asyncio.sleep(0)
        self.batches.append([item.payload.decode() for item in request.items])
        if self.fail_batches is not None:
            raise self.fail_batches
        return answer(request, self.refuse)

    def batcher(self, max_items: int = 500) -> SubmitBatcher:
        return SubmitBatcher(self.try_batch, lambda: "server:1", max_items)


async def submit_all(batcher: SubmitBatcher, payloads) -> list:
    submits = (batcher.submit(submit_request("math", payload)) for payload in payloads)
    return await asyncio.gather(*submits, return_exceptions=True)


def test_submits_of_one_loop_turn_share_a_call_and_get_their_own_ids_in_order():
    server = FakeServer()
    payloads = [str(i) for i in range(1200)]
    assert run(submit_all, server.batcher(max_items=500), payloads) == [f"id-{p}" for p in payloads]
    assert [len(b) for b in server.batches] == [500, 500, 200]


def test_a_lone_submit_is_left_to_its_own_call():
    server = FakeServer()

    async def one_after_another(batcher):
        return [await batcher.submit(submit_request("math", p)) for p in ("1", "2")]

    assert run(one_after_another, server.batcher()) == [ALONE, ALONE]
    assert server.batches == []


def test_a_refused_item_gets_what_a_lone_submit_would_meet():
    server = FakeServer(refuse={"1 +": (grpc.StatusCode.INVALID_ARGUMENT, "payload: not an expression",
                                        "INVALID_FIELD")})
    outcomes = run(submit_all, server.batcher(), ["1", "1 +", "2"])
    assert outcomes[0] == "id-1" and outcomes[2] == "id-2"
    assert outcomes[1] == Failed("server:1", grpc.StatusCode.INVALID_ARGUMENT, "payload: not an expression",
                                 None, "INVALID_FIELD")


def test_a_call_that_fails_whole_gives_each_item_its_failure_with_the_retry_hint():
    server = FakeServer(fail_batches=CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_ms=250))
    outcomes = run(submit_all, server.batcher(), ["a", "b"])
    assert outcomes == [Failed("server:1", grpc.StatusCode.RESOURCE_EXHAUSTED, "scripted RESOURCE_EXHAUSTED",
                               0.25, None)] * 2


def test_a_failure_feeds_the_submit_s_own_attempts_as_a_lone_submit_s_error_would():
    attempts = Attempts(Failover(["server:1"]), window_s=30.0, retry_codes=SUBMIT_RETRY_CODES)
    hinted = Failed("server:1", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", 0.25, "OVERLOADED")
    assert hinted.next_try_s(attempts) == 0.25  # the server's hint, not at once
    refused = Failed("server:1", grpc.StatusCode.INVALID_ARGUMENT, "payload: bad", None, "INVALID_FIELD")
    with pytest.raises(RemoteError) as error:
        refused.next_try_s(attempts)
    assert (error.value.code, error.value.reason, str(error.value)) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "payload: bad")


def test_a_server_without_submit_tasks_ends_batching_for_the_client():
    server = FakeServer(fail_batches=CallFailed(grpc.StatusCode.UNIMPLEMENTED))
    batcher = server.batcher()
    assert run(submit_all, batcher, ["a", "b"]) == [ALONE, ALONE]
    assert run(submit_all, batcher, ["c", "d"]) == [ALONE, ALONE]
    assert server.batches == [["a", "b"]] and not batcher.enabled


def test_a_submit_cancelled_before_the_call_is_not_sent():
    server = FakeServer()

    async def body(batcher):
        kept = [asyncio.ensure_future(batcher.submit(submit_request("math", p))) for p in ("a", "b", "c")]
        dropped = asyncio.ensure_future(batcher.submit(submit_request("math", "x")))
        await asyncio.sleep(0)  # every submit is waiting for the flush
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        return await asyncio.gather(*kept)

    assert run(body, server.batcher()) == ["id-a", "id-b", "id-c"]
    assert server.batches == [["a", "b", "c"]]


def test_closing_cancels_the_submits_of_a_call_in_flight():
    async def body():
        gate = asyncio.Event()

        async def stuck(request, address):
            gate.set()
            await asyncio.sleep(3600)

        batcher = SubmitBatcher(stuck, lambda: "server:1", 500)
        submits = asyncio.gather(*(batcher.submit(submit_request("math", p)) for p in ("a", "b")))
        await gate.wait()
        await batcher.close()
        with pytest.raises(asyncio.CancelledError):
            await submits

    run(body, timeout_s=20.0)


# -- qm.Client: threads sharing one client ----------------------------------------------


class FakeBlockingServer:
    """The blocking client's calls: `try_one` holds its call until `gate` opens; every call
    lasts at least `call_s`."""

    def __init__(self, refuse=None, fail_batches: CallFailed | None = None, call_s: float = 0.0):
        self.refuse = refuse or {}
        self.fail_batches = fail_batches
        self.call_s = call_s
        self.gate = threading.Event()
        self.gate.set()
        self.alone: list[str] = []
        self.batches: list[list[str]] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def _enter(self):
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.call_s)

    def _leave(self):
        with self._lock:
            self.in_flight -= 1

    def try_one(self, request, address):
        self._enter()
        try:
            assert self.gate.wait(TIMEOUT_S)
            payload = request.payload.decode()
            self.alone.append(payload)
            if payload in self.refuse:
                raise CallFailed(self.refuse.pop(payload)[0])
            return f"id-{payload}"
        finally:
            self._leave()

    def try_batch(self, request, address):
        self._enter()
        try:
            self.batches.append([item.payload.decode() for item in request.items])
            if self.fail_batches is not None:
                raise self.fail_batches
            return answer(request, self.refuse)
        finally:
            self._leave()

    def batcher(self, max_calls: int = 1) -> ThreadSubmitBatcher:
        return ThreadSubmitBatcher(self.try_one, self.try_batch, lambda: "server:1", max_items=500,
                                   max_calls=max_calls)


def submit_from_threads(batcher: ThreadSubmitBatcher, payloads) -> dict[str, object]:
    """Each payload submitted from a thread of its own; the outcome of each."""
    outcomes: dict[str, object] = {}

    def one(payload):
        outcomes[payload] = batcher.submit(submit_request("math", payload))

    threads = [threading.Thread(target=one, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def queued_behind_a_call(server: FakeBlockingServer, batcher: ThreadSubmitBatcher, payloads) -> dict[str, object]:
    """Submit "first" alone and hold its call out (one call allowed) until a thread per
    payload has queued its submit; then let it go. The outcome of each payload's submit."""
    server.gate.clear()
    first = threading.Thread(target=lambda: batcher.submit(submit_request("math", "first")))
    first.start()
    wait_for(lambda: server.in_flight == 1)
    outcomes: dict[str, object] = {}
    others = threading.Thread(target=lambda: outcomes.update(submit_from_threads(batcher, payloads)))
    others.start()
    wait_for(lambda: len(batcher._waiting) == len(payloads))
    server.gate.set()
    first.join(TIMEOUT_S)
    others.join(TIMEOUT_S)
    assert not first.is_alive() and not others.is_alive()
    return outcomes


def test_threads_that_submit_while_a_call_is_out_share_the_next_call():
    server = FakeBlockingServer()
    waiting = [str(i) for i in range(20)]
    outcomes = queued_behind_a_call(server, server.batcher(max_calls=1), waiting)
    assert outcomes == {p: f"id-{p}" for p in waiting}
    assert server.alone == ["first"] and [sorted(b) for b in server.batches] == [sorted(waiting)]


def test_a_lone_thread_sends_each_submit_as_one_call():
    server = FakeBlockingServer()
    batcher = server.batcher()
    assert [batcher.submit(submit_request("math", p)) for p in ("1", "2")] == ["id-1", "id-2"]
    assert server.alone == ["1", "2"] and server.batches == []


def test_no_more_calls_than_the_limit_are_out_at_once_and_each_submit_is_sent_once():
    server = FakeBlockingServer(call_s=0.002)  # calls stay out while other threads queue
    payloads = [str(i) for i in range(60)]
    outcomes = submit_from_threads(server.batcher(max_calls=2), payloads)
    assert outcomes == {p: f"id-{p}" for p in payloads}
    assert 1 <= server.most_in_flight <= 2
    sent = server.alone + [p for batch in server.batches for p in batch]
    assert sorted(sent) == sorted(payloads) and all(server.batches)  # no empty call, none twice


def test_a_blocking_client_s_refusals_are_what_a_lone_submit_gets():
    server = FakeBlockingServer(refuse={"1 +": (grpc.StatusCode.INVALID_ARGUMENT, "payload: bad", "INVALID_FIELD"),
                                        "full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "QUEUE_FULL")})
    outcomes = queued_behind_a_call(server, server.batcher(max_calls=1), ["a", "1 +", "full"])
    assert outcomes["a"] == "id-a"
    assert outcomes["full"] == Failed("server:1", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", None,
                                      "QUEUE_FULL")
    assert outcomes["1 +"] == Failed("server:1", grpc.StatusCode.INVALID_ARGUMENT, "payload: bad", None,
                                     "INVALID_FIELD")


def test_a_blocking_client_facing_a_server_without_submit_tasks_stops_batching():
    server = FakeBlockingServer(fail_batches=CallFailed(grpc.StatusCode.UNIMPLEMENTED))
    batcher = server.batcher(max_calls=1)
    outcomes = queued_behind_a_call(server, batcher, ["a", "b"])
    assert outcomes == {"a": ALONE, "b": ALONE} and not batcher.enabled


def wait_for(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
