"""Dramatiq's side of load/bench_vs_dramatiq.py: the same task bodies QueueMaster runs.

`trivial` is QueueMaster's `math` evaluator, `spin_timed` the `test.spin_timed` body the
dispatch benchmark uses. Each run tells the benchmark it ended with one datagram to
$QM_BENCH_DONE_SOCKET, "TAG RESULT": Dramatiq has no result stream without a result
backend, and a datagram on a local socket costs a run a few microseconds.

The broker is Dramatiq's RabbitmqBroker on $QM_BENCH_BROKER_URL with its defaults, as a
new user gets it. Started by the benchmark as `dramatiq dramatiq_actors`.
"""
from __future__ import annotations

import os
import socket
import threading

import dramatiq
import qm_testtasks
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from qm.tasks import math as qm_math

#: Dramatiq's queue for the benchmark (QueueMaster's queues are named qm.*); the benchmark
#: names one per run on a shared node.
QUEUE = os.environ.get("QM_BENCH_DRAMATIQ_QUEUE", "qm-bench-dramatiq")

dramatiq.set_broker(RabbitmqBroker(url=os.environ["QM_BENCH_BROKER_URL"]))
_local = threading.local()


def _report(tag: int, result: str) -> None:
    sock = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.sendto(f"{tag} {result}".encode(), os.environ["QM_BENCH_DONE_SOCKET"])
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # a message left from an earlier run: nobody waits for it


@dramatiq.actor(queue_name=QUEUE)
def trivial(tag: int, payload: str) -> None:
    """QueueMaster's `math` task: evaluate the expression."""
    _report(tag, qm_math.run(payload))


@dramatiq.actor(queue_name=QUEUE)
def spin_timed(tag: int, seconds: str) -> None:
    """Pure-Python CPU for `seconds`; reports "PID START END LOOPS" (time.time())."""
    _report(tag, qm_testtasks.spin_timed(seconds))
