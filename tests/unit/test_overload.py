"""Overload (issue 16, item 2): the server refuses beyond its limit with a retry hint and
never drops a call as CANCELLED; qm.Client retries a refused or unanswered submit with the
same idempotency key. In-process gRPC servers on loopback, no RabbitMQ."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import qm.aio
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.client.client import Client, RemoteError
from qm.client.common import error_reason
from qm.metrics import ServerMetrics
from qm.reasons import Reason
from qm.server.admission import CORE_OPTIONS, RETRY_PUSHBACK_KEY, AdmissionInterceptor
from tests.unit.aio import run, within

SERVICE = "qm.v1.TaskQueue"


# -- the server's admission limit ---------------------------------------------------------


class HeldServicer(task_queue_pb2_grpc.TaskQueueServicer):
    """SubmitTask and StreamTaskResults wait until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.changed = asyncio.Condition()

    async def _enter(self) -> None:
        async with self.changed:
            self.entered += 1
            self.changed.notify_all()
        await self.release.wait()

    async def SubmitTask(self, request, context):
        await self._enter()
        return task_queue_pb2.SubmitTaskResponse(task_id=request.idempotency_key)

    async def StreamTaskResults(self, request_iterator, context):
        await self._enter()
        yield task_queue_pb2.StreamTaskResultsResponse()


async def _admission_refuses_beyond_the_limit_with_a_hint():
    metrics = ServerMetrics()
    admission = AdmissionInterceptor(SERVICE, 2, metrics, retry_after_ms=150)
    server = grpc.aio.server(interceptors=[admission], options=CORE_OPTIONS)
    servicer = HeldServicer()
    task_queue_pb2_grpc.add_TaskQueueServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = task_queue_pb2_grpc.TaskQueueStub(channel)
            held = [asyncio.ensure_future(stub.SubmitTask(task_queue_pb2.SubmitTaskRequest(idempotency_key="a"))),
                    asyncio.ensure_future(stub.SubmitTask(task_queue_pb2.SubmitTaskRequest(idempotency_key="b")))]
            async with servicer.changed:
                await within(servicer.changed.wait_for(lambda: servicer.entered == 2))
            assert metrics.grpc_in_flight.collect()[0].samples[0].value == 2

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await within(stub.SubmitTask(task_queue_pb2.SubmitTaskRequest(idempotency_key="c")))
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_concurrent_rpcs" in refused.value.details()
            assert (RETRY_PUSHBACK_KEY, "150") in tuple(refused.value.trailing_metadata())
            assert error_reason(refused.value) is Reason.OVERLOADED  # what clients decide on

            # No request written: a grpc.aio client whose write races the server's refusal
            # may report its own INTERNAL instead of the server's status (grpc/grpc#36066).
            stream = stub.StreamTaskResults()
            with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
                await within(stream.read())
            assert stream_refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

            # Health checks are outside the limit: probes keep answering under overload.
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            answer = await within(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

            # The held calls were taken, so they finish; then there is room again.
            servicer.release.set()
            assert [r.task_id for r in await within(asyncio.gather(*held))] == ["a", "b"]
            again = await within(stub.SubmitTask(task_queue_pb2.SubmitTaskRequest(idempotency_key="c")))
            assert again.task_id == "c"
            assert admission.in_flight == 0
        refused_total = {s.labels["method"]: s.value for s in metrics.grpc_refused.collect()[0].samples
                         if s.name.endswith("_total")}
        assert refused_total == {"SubmitTask": 1, "StreamTaskResults": 1}
    finally:
        await server.stop(0)


def test_admission_refuses_beyond_the_limit_with_a_retry_hint_and_counts_it():
    run(_admission_refuses_beyond_the_limit_with_a_hint)


async def _zero_is_no_limit():
    admission = AdmissionInterceptor(SERVICE, 0, ServerMetrics())
    server = grpc.aio.server(interceptors=[admission], options=CORE_OPTIONS)
    servicer = HeldServicer()
    servicer.release.set()
    task_queue_pb2_grpc.add_TaskQueueServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = task_queue_pb2_grpc.TaskQueueStub(channel)
            answers = await within(asyncio.gather(*(stub.SubmitTask(task_queue_pb2.SubmitTaskRequest(
                idempotency_key=str(i))) for i in range(50))))
            assert len(answers) == 50
    finally:
        await server.stop(0)


def test_a_limit_of_zero_refuses_nothing():
    run(_zero_is_no_limit)


# -- qm.Client retries a submit with the same key -------------------------------------------


class ScriptedServicer(task_queue_pb2_grpc.TaskQueueServicer):
    """Answers SubmitTask and SubmitTasks calls with the scripted codes in turn, then OK;
    records each key, when each call came, and the size of each SubmitTasks call."""

    def __init__(self, script: list[tuple[grpc.StatusCode, tuple]]) -> None:
        self.script = list(script)
        self.keys: list[str] = []
        self.batches: list[int] = []
        self.call_times: list[float] = []  # when each SubmitTask(s) call arrived
        self.lock = threading.Lock()

    def _take_step(self, context, keys: list[str], batch: int | None = None) -> None:
        """Record the call; answer it with the next scripted code, if any is left."""
        with self.lock:
            self.keys.extend(keys)
            if batch is not None:
                self.batches.append(batch)
            self.call_times.append(time.monotonic())
            step = self.script.pop(0) if self.script else None
        if step is not None:
            code, trailing = step
            context.set_trailing_metadata(trailing)
            context.abort(code, f"scripted {code.name}")

    def SubmitTasks(self, request, context):
        self._take_step(context, [item.idempotency_key for item in request.items], len(request.items))
        response = task_queue_pb2.SubmitTasksResponse()
        for item in request.items:
            response.results.add(task_id=f"task-{item.payload.decode()}")
        return response

    def SubmitTask(self, request, context):
        self._take_step(context, [request.idempotency_key])
        return task_queue_pb2.SubmitTaskResponse(task_id="task-1")

    def GetTaskStatus(self, request, context):
        with self.lock:
            self.keys.append("status")
        context.abort(grpc.StatusCode.CANCELLED, "scripted CANCELLED")


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        servicer = ScriptedServicer(script)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        task_queue_pb2_grpc.add_TaskQueueServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_submit_retries_refused_cancelled_and_timed_out_calls_with_the_same_key(scripted):
    servicer, address = scripted([
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_KEY, "10"),)),
        (grpc.StatusCode.CANCELLED, ()),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ()),
        (grpc.StatusCode.UNAVAILABLE, ()),
    ])
    with Client(address, submit_retry_s=30) as client:
        assert client.submit("math", "1 + 1") == "task-1"
    assert len(servicer.keys) == 5
    assert len(set(servicer.keys)) == 1 and servicer.keys[0]


def test_submit_does_not_retry_other_codes(scripted):
    servicer, address = scripted([(grpc.StatusCode.INVALID_ARGUMENT, ())])
    with Client(address, submit_retry_s=30) as client:
        with pytest.raises(RemoteError) as error:
            client.submit("math", "1 + 1")
    assert error.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(servicer.keys) == 1


def test_submit_gives_up_when_the_retry_hint_is_past_submit_retry_s(scripted):
    servicer, address = scripted([(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_KEY, "60000"),))])
    with Client(address, submit_retry_s=1) as client:
        with pytest.raises(RemoteError) as error:
            client.submit("math", "1 + 1")
    assert error.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.retry_after_s == 60.0
    assert len(servicer.keys) == 1


def _gather_submits(address: str, submit_retry_s: float, count: int) -> list:
    async def body():
        async with qm.aio.Client(address, submit_retry_s=submit_retry_s) as client:
            return await asyncio.gather(*(client.submit("math", str(i)) for i in range(count)),
                                        return_exceptions=True)
    return run(body)


def test_gathered_submits_refused_as_a_batch_wait_for_the_hint_then_go_again_with_their_keys(scripted):
    servicer, address = scripted([(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_KEY, "300"),))])
    outcomes = _gather_submits(address, 30, 3)
    assert all(isinstance(o, str) and o.startswith("task-") for o in outcomes), outcomes
    assert servicer.batches[0] == 3  # the first try: one call for the three
    assert len(servicer.keys) == 6 and len(set(servicer.keys)) == 3  # each sent once more, same key
    refused_at = servicer.call_times[0]
    assert all(at - refused_at >= 0.3 for at in servicer.call_times[1:]), servicer.call_times  # after the hint


def test_gathered_submits_give_up_when_the_hint_is_past_submit_retry_s(scripted):
    servicer, address = scripted([(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_KEY, "60000"),))])
    outcomes = _gather_submits(address, 1, 3)
    assert all(isinstance(o, RemoteError) and o.code is grpc.StatusCode.RESOURCE_EXHAUSTED
               and o.retry_after_s == 60.0 for o in outcomes), outcomes
    assert servicer.batches == [3]  # nothing sent again before the hint


def test_only_submits_are_retried(scripted):
    servicer, address = scripted([])
    with Client(address, submit_retry_s=30) as client:
        with pytest.raises(RemoteError) as error:
            client.status("t")
    assert error.value.code is grpc.StatusCode.CANCELLED
    assert servicer.keys == ["status"]
