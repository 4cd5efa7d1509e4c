"""Celery's side of load/bench_side_by_side.py: the same task bodies QueueMaster runs.

As load/dramatiq_actors.py: `trivial` is QueueMaster's `math` evaluator, `spin_timed` the
`test.spin_timed` body, and each run reports its end to the benchmark (load/bench_done.py;
no result backend, Celery's default). The app uses RabbitMQ at $QM_BENCH_BROKER_URL with
Celery's defaults otherwise, as a new user gets it. Started by the
benchmark as `celery -A celery_tasks worker --pool prefork -c 2`.
"""
from __future__ import annotations

import os

import qm_testtasks
from bench_done import report
from celery import Celery

from qm.tasks import math as qm_math

app = Celery("qm-bench", broker=os.environ["QM_BENCH_BROKER_URL"])
#: Celery's queue for the benchmark; the benchmark names one per run on a shared node.
app.conf.task_default_queue = os.environ.get("QM_BENCH_CELERY_QUEUE", "qm-bench-celery")


@app.task
def trivial(tag: int, payload: str) -> None:
    """QueueMaster's `math` task: evaluate the expression."""
    report(tag, qm_math.run(payload))


@app.task
def spin_timed(tag: int, seconds: str) -> None:
    """Pure-Python CPU for `seconds`; reports "PID START END LOOPS" (time.time())."""
    report(tag, qm_testtasks.spin_timed(seconds))
