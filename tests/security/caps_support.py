"""What the caps tests share: a real qm-server (and worker) per module, a hostile raw gRPC
client, and a normal client probing the server while the attack runs. What was stored and
enqueued is read with tests/security/support.py, as for the auth and TLS tests.
"""
from __future__ import annotations

import contextlib
import pathlib
import threading
import types

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from tests.processes import band_queues, delete_queues, start_server, start_worker
from tests.security.support import NORMAL_DEADLINE_S, probe

#: Deadline of a hostile call: long enough to get its answer on a loaded machine.
CALL_TIMEOUT_S = 30.0
#: Pause between two probes of the normal client.
PROBE_INTERVAL_S = 0.1


@contextlib.contextmanager
def caps_stack(broker_url: str, directory: pathlib.Path, env: dict[str, str], queues: list[str],
               worker_queue: str | None = None):
    """A qm-server with `env` (and a one-child worker on `worker_queue`, with the same
    broker settings); stopped, and its queues deleted, on exit."""
    server = start_server(broker_url, directory, env=env)
    worker = None
    try:
        if worker_queue:
            broker_env = {key: value for key, value in env.items() if key.startswith("QM_BROKER__")}
            worker = start_worker(broker_url, procs=1, queues=worker_queue, env=broker_env)
        with grpc.insecure_channel(server.address) as channel:
            yield types.SimpleNamespace(server=server, worker=worker, broker_url=broker_url,
                                        stub=task_queue_pb2_grpc.TaskQueueStub(channel))
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        delete_queues(broker_url, [name for queue in queues for name in band_queues(queue)]
                      + [f"qm.events.{server.server_id}", f"qm.dead.{server.server_id}"])


def submit_error(stub, type: str, payload: bytes, queue: str, **fields) -> grpc.RpcError:
    """Submit; return the error (the test fails if a task id came back)."""
    request = task_queue_pb2.SubmitTaskRequest(type=type, payload=payload, queue=queue, **fields)
    try:
        response = stub.SubmitTask(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"submission of {type} {payload[:40]!r} to {queue!r} was accepted as {response.task_id}")


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return {key: value for key, value in (error.trailing_metadata() or ())}


class NormalClient:
    """A well-behaved client asking the server over and over, each probe with a deadline of
    NORMAL_DEADLINE_S (tests/security/support.py: PROBE_TRIES tries), while an attack runs: a
    health check and ListTaskTypes on its own channel. `failures` lists every call not answered in time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="normal-client", daemon=True)

    def __enter__(self) -> "NormalClient":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.ask()  # and after the attack

    def ask(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)  # connecting is not answering
            health = health_pb2_grpc.HealthStub(channel)
            stub = task_queue_pb2_grpc.TaskQueueStub(channel)

            def check(deadline_s: float) -> None:
                request = health_pb2.HealthCheckRequest(service="qm.v1.TaskQueue")
                assert health.Check(request, timeout=deadline_s).status == health_pb2.HealthCheckResponse.SERVING
                assert stub.ListTaskTypes(task_queue_pb2.ListTaskTypesRequest(), timeout=deadline_s).types

            code = probe(check)
            if code is None:
                self.answered += 1
            else:
                self.failures.append(code.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ask()
            self._stop.wait(PROBE_INTERVAL_S)

    def check(self) -> None:
        assert self.answered >= 1 and not self.failures, (
            f"the normal client was not answered within {NORMAL_DEADLINE_S} s: {self.failures[:5]} "
            f"({self.answered} answered)")
