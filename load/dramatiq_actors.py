"""Dramatiq's side of load/bench_side_by_side.py: the same task bodies QueueMaster runs.

`trivial` is QueueMaster's `math` evaluator, `spin_timed` the `test.spin_timed` body the
dispatch benchmark uses; each run reports its end to the benchmark (load/bench_done.py).
The broker is Dramatiq's RabbitmqBroker on $QM_BENCH_BROKER_URL with its defaults, as a
new user gets it. Started by the benchmark as `dramatiq dramatiq_actors`.
"""
from __future__ import annotations

import os

import dramatiq
import qm_testtasks
from bench_done import report
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from qm.tasks import math as qm_math

#: Dramatiq's queue for the benchmark (QueueMaster's queues are named qm.*); the benchmark
#: names one per run on a shared node.
QUEUE = os.environ.get("QM_BENCH_DRAMATIQ_QUEUE", "qm-bench-dramatiq")

dramatiq.set_broker(RabbitmqBroker(url=os.environ["QM_BENCH_BROKER_URL"]))


@dramatiq.actor(queue_name=QUEUE)
def trivial(tag: int, payload: str) -> None:
    """QueueMaster's `math` task: evaluate the expression."""
    report(tag, qm_math.run(payload))


@dramatiq.actor(queue_name=QUEUE)
def spin_timed(tag: int, seconds: str) -> None:
    """Pure-Python CPU for `seconds`; reports "PID START END LOOPS" (time.time())."""
    report(tag, qm_testtasks.spin_timed(seconds))
