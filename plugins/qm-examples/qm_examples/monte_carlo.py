"""``examples.monte_carlo_pi``: estimate pi by sampling points in the unit square.

Payload (json codec): ``{"samples": N, "seed": S}``: N an integer from 1 to 50,000,000;
S an integer from 0 to 2**64 - 1, optional (default 0). Result (json):
``{"pi": 4 * inside / N}``, where ``inside`` counts the points (x, y), drawn as
``x = rng.random(); y = rng.random()`` with ``rng = random.Random(S)``, that satisfy
``x*x + y*y <= 1``. The same payload always gives the same result (on the same Python).
"""
from __future__ import annotations

import random

from qm.registry import TaskType
from qm_examples._payload import checked, integer, json_object

#: Largest accepted number of samples.
MAX_SAMPLES = 50_000_000
#: Largest accepted seed.
MAX_SEED = 2**64 - 1


def validate(payload: object) -> None:
    """Runs in qm-server at submit: {"samples": 1..50,000,000, "seed": 0..2**64-1 (optional)}."""
    obj = json_object(payload, '{"samples": 1000000, "seed": 42}', ("samples", "seed"))
    integer(obj, "samples", 1, MAX_SAMPLES)
    integer(obj, "seed", 0, MAX_SEED, default=0)


def estimate_pi(samples: int, seed: int = 0) -> float:
    """4 × the share of `samples` random points of the unit square inside the quarter circle."""
    rand = random.Random(seed).random
    inside = 0
    for _ in range(samples):
        x = rand()
        y = rand()
        if x * x + y * y <= 1.0:
            inside += 1
    return 4 * inside / samples


def run(payload: dict) -> dict:
    """Handler: runs in a worker child on the decoded JSON payload."""
    checked(validate, payload)
    return {"pi": estimate_pi(payload["samples"], payload.get("seed", 0))}


TASK_TYPE = TaskType(
    name="examples.monte_carlo_pi",
    handler=run,
    codec="json",
    validate=validate,
    description='Monte Carlo estimate of pi, deterministic per seed: {"samples": N, "seed": S}',
    default_timeout_s=120,
    max_timeout_s=900,
    default_memory_limit_mb=256,
)
