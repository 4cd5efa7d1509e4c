"""Locust load test of qm-server, over gRPC (qm.v1.TaskQueue; no HTTP).

    locust -f load/locustfile.py --headless -u 10 -r 5 -t 30s --host 127.0.0.1:50051

Each simulated user loops: submit a small task (a random mix of `math`,
`examples.primes` and `examples.hash_chain`), then follow it with StreamTaskResults
until it is terminal, and check its result. Two kinds of entries appear in Locust's
statistics:

- `grpc SubmitTask`: the SubmitTask RPC (answered once RabbitMQ has confirmed the task).
- `task <type>`: end to end, from just before SubmitTask to the terminal state arriving
  on the stream (queueing, execution and event delivery included).

An RPC error, a task ending in any state but SUCCEEDED, a wrong result, or no terminal
state within --qm-task-timeout is a failure of its entry.

Options (after the usual Locust ones; each also from the environment variable shown):
  --host HOST:PORT          qm-server (LOCUST_HOST; default $QM_CLIENT__SERVER, else
                            127.0.0.1:50051); a grpc:// prefix is accepted
  --qm-queue NAME           logical queue to submit to (LOCUST_QM_QUEUE; default: the server's "default")
  --qm-types T1,T2|auto     task types to mix (LOCUST_QM_TYPES; default auto: of math,
                            examples.primes and examples.hash_chain, those the server has,
                            asked once with ListTaskTypes; the mix used is logged)
  --qm-task-timeout S       bound on waiting for a task's end, seconds (LOCUST_QM_TASK_TIMEOUT; default 60)
  --qm-wait S               think time between a user's tasks, seconds (LOCUST_QM_WAIT; default 0.1)

TLS and auth come from the environment as for `qm`: QM_CLIENT__TLS_CA (the server's CA:
connect with TLS), QM_CLIENT__TOKEN (a `submit` token), QM_CLIENT__TLS_CERT and
QM_CLIENT__TLS_KEY (mTLS).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
import uuid

# Make grpcio's blocking calls cooperate with gevent (which Locust runs users on); must
# happen before any channel exists.
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
from locust import User, events, task  # noqa: E402

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc  # noqa: E402
from qm.client.credentials import ChannelSecurity  # noqa: E402
from qm.states import TaskState, state_name  # noqa: E402

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TYPES = "auto"
#: Relative frequency of each task type in the mix.
WEIGHTS = {"math": 3, "examples.primes": 1, "examples.hash_chain": 1}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("QueueMaster")
    group.add_argument("--qm-queue", env_var="LOCUST_QM_QUEUE", default="",
                       help="logical queue to submit to (default: the server's 'default')")
    group.add_argument("--qm-types", env_var="LOCUST_QM_TYPES", default=DEFAULT_TYPES,
                       help=f"comma-separated task types to mix, of {', '.join(WEIGHTS)}; auto (default): "
                            "those of them the server has (ListTaskTypes)")
    group.add_argument("--qm-task-timeout", env_var="LOCUST_QM_TASK_TIMEOUT", type=float, default=60.0,
                       help="seconds to wait for a task to end before counting it a failure")
    group.add_argument("--qm-wait", env_var="LOCUST_QM_WAIT", type=float, default=0.1,
                       help="think time between a user's tasks, seconds")


# ---------------------------------------------------------------- payloads ---
# Each returns (payload bytes, expected result bytes). Sizes stay small: this measures the
# queue, not the CPU work.

def _math() -> tuple[bytes, bytes]:
    a, b, c = random.randint(1, 999), random.randint(1, 999), random.randint(0, 999)
    return f"{a} * {b} + {c}".encode(), str(a * b + c).encode()


def _primes_below(n: int) -> int:
    sieve = bytearray([1]) * n
    sieve[:2] = b"\x00\x00"
    for p in range(2, math.isqrt(n - 1) + 1):
        if sieve[p]:
            sieve[p * p::p] = bytes(len(range(p * p, n, p)))
    return sieve.count(1)


def _primes() -> tuple[bytes, bytes]:
    below = random.randint(1_000, 20_000)
    expected = {"below": below, "count": _primes_below(below)}
    return json.dumps({"below": below}).encode(), json.dumps(expected).encode()


def _hash_chain() -> tuple[bytes, bytes]:
    rounds, seed = random.randint(100, 2_000), uuid.uuid4().hex
    digest = seed.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return f"{rounds}:{seed}".encode(), digest.hex().encode()


PAYLOADS = {"math": _math, "examples.primes": _primes, "examples.hash_chain": _hash_chain}


def _same_result(task_type: str, got: bytes, expected: bytes) -> bool:
    if task_type == "examples.primes":  # json: compare values, not spelling
        try:
            return json.loads(got) == json.loads(expected)
        except ValueError:
            return False
    return got.strip() == expected


def server_address(host: str | None) -> str:
    """--host as gRPC wants it: HOST:PORT, without any scheme."""
    address = host or os.environ.get("QM_CLIENT__SERVER") or DEFAULT_SERVER
    for scheme in ("grpc://", "http://", "https://"):
        if address.startswith(scheme):
            address = address[len(scheme):]
    return address.rstrip("/")


class TaskFailed(Exception):
    """A task did not end SUCCEEDED with the expected result."""


_MIX: list[str] = []  # the mix in use, decided once per Locust process


def task_mix(option: str, stub: task_queue_pb2_grpc.TaskQueueStub) -> list[str]:
    """The task types to mix: those named, or ("auto") those of PAYLOADS the server has."""
    if _MIX:
        return list(_MIX)
    if option.strip().lower() == "auto":
        served = {t.name for t in stub.ListTaskTypes(task_queue_pb2.ListTaskTypesRequest(), timeout=30).types}
        names = [t for t in PAYLOADS if t in served]
        if not names:
            raise ValueError(f"the server has none of the task types this load test knows ({', '.join(PAYLOADS)})")
    else:
        names = [t.strip() for t in option.split(",") if t.strip()]
        unknown = [t for t in names if t not in PAYLOADS]
        if unknown or not names:
            raise ValueError(f"--qm-types: unknown task type(s) {unknown}; choose from {', '.join(PAYLOADS)}")
    if not _MIX:  # users start concurrently (gevent): the first to get here decides
        _MIX.extend(names)
        logging.getLogger("qm.locust").info("task mix: %s", ", ".join(f"{t} x{WEIGHTS[t]}" for t in names))
    return list(_MIX)


class QueueMasterUser(User):
    """Submits a task, follows it to its end, repeats."""

    def wait_time(self) -> float:
        return self.environment.parsed_options.qm_wait if self.environment.parsed_options else 0.1

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.queue = options.qm_queue if options else ""
        self.task_timeout_s = options.qm_task_timeout if options else 60.0
        # TLS and token as for every client: QM_CLIENT__TLS_CA, QM_CLIENT__TOKEN, QM_CLIENT__TLS_CERT/KEY.
        security = ChannelSecurity.load(*(os.environ.get(f"QM_CLIENT__{key}") for key in
                                          ("TLS_CA", "TOKEN", "TLS_CERT", "TLS_KEY")))
        self.channel = security.channel(server_address(self.host))
        self.stub = task_queue_pb2_grpc.TaskQueueStub(self.channel)
        self.types = task_mix(options.qm_types if options else DEFAULT_TYPES, self.stub)
        self.weights = [WEIGHTS[t] for t in self.types]

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, request_type: str, name: str, started: float, length: int = 0,
              exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})

    @task
    def submit_and_wait(self) -> None:
        task_type = random.choices(self.types, self.weights)[0]
        payload, expected = PAYLOADS[task_type]()
        request = task_queue_pb2.SubmitTaskRequest(type=task_type, payload=payload, queue=self.queue,
                                                   idempotency_key=str(uuid.uuid4()))
        started = time.perf_counter()
        try:
            response = self.stub.SubmitTask(request, timeout=30)
        except grpc.RpcError as exc:
            error = TaskFailed(f"SubmitTask {exc.code().name}: {exc.details()}")
            self._fire("grpc", "SubmitTask", started, exception=error)
            self._fire("task", task_type, started, exception=error)
            return
        self._fire("grpc", "SubmitTask", started, length=len(request.payload))
        try:
            status = self._await_terminal(response.task_id)
            if status.state != task_queue_pb2.TASK_STATE_SUCCEEDED:
                raise TaskFailed(f"{state_name(status.state)}: {status.error[:200]}")
            if not _same_result(task_type, status.result, expected):
                raise TaskFailed(f"wrong result {status.result[:100]!r}, expected {expected[:100]!r}")
        except (TaskFailed, grpc.RpcError) as exc:
            if isinstance(exc, grpc.RpcError):
                exc = TaskFailed(f"StreamTaskResults {exc.code().name}: {exc.details()}")
            self._fire("task", task_type, started, exception=exc)
            return
        self._fire("task", task_type, started, length=len(status.result))

    def _await_terminal(self, task_id: str) -> task_queue_pb2.TaskStatus:
        """Follow the task on StreamTaskResults (sent one id, then half-closed) until its
        terminal state; the server ends the stream right after it."""
        requests = iter([task_queue_pb2.StreamTaskResultsRequest(task_ids=[task_id])])
        last = None
        for response in self.stub.StreamTaskResults(requests, timeout=self.task_timeout_s):
            last = response.status
            if TaskState.of_number(last.state).terminal:
                return last
        state = state_name(last.state) if last is not None else "nothing"
        raise TaskFailed(f"stream ended without a terminal state (last: {state})")
