"""examples.monte_carlo_pi: deterministic results and validation."""
import math
import random

import pytest
from qm_examples import monte_carlo

from qm.errors import ValidationError


def independent_estimate(samples: int, seed: int) -> float:
    rng = random.Random(seed)
    inside = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return 4 * inside / samples


def test_result_matches_an_independent_computation():
    assert monte_carlo.run({"samples": 10_000, "seed": 7}) == {"pi": independent_estimate(10_000, 7)}


def test_same_seed_same_result_other_seed_other_result():
    first = monte_carlo.run({"samples": 20_000, "seed": 1})
    assert monte_carlo.run({"samples": 20_000, "seed": 1}) == first
    assert monte_carlo.run({"samples": 20_000, "seed": 2}) != first


def test_seed_defaults_to_zero():
    assert monte_carlo.run({"samples": 1_000}) == monte_carlo.run({"samples": 1_000, "seed": 0})


def test_estimate_is_close_to_pi():
    assert abs(monte_carlo.run({"samples": 200_000, "seed": 3})["pi"] - math.pi) < 0.02


def test_result_is_json_through_the_codec():
    declared = monte_carlo.TASK_TYPE
    value = declared.handler(declared.decode_payload(b'{"samples": 1, "seed": 0}'))
    assert declared.encode_result(value) in (b'{"pi": 4.0}', b'{"pi": 0.0}')


@pytest.mark.parametrize("payload", [{"samples": 1}, {"samples": 50_000_000, "seed": 2**64 - 1}])
def test_accepts_bounds(payload):
    monte_carlo.validate(payload)


@pytest.mark.parametrize("payload, words", [
    ([], ["JSON object", "an array"]),
    ({"seed": 1}, ["payload.samples", "missing"]),
    ({"samples": 0}, ["payload.samples", "got 0"]),
    ({"samples": 50_000_001}, ["payload.samples", "50_000_000"]),
    ({"samples": 10.0}, ["payload.samples", "integer"]),
    ({"samples": 10, "seed": -1}, ["payload.seed", "got -1"]),
    ({"samples": 10, "seed": 2**64}, ["payload.seed"]),
    ({"samples": 10, "seed": "abc"}, ["payload.seed", "integer", "string"]),
    ({"samples": 10, "seed": None}, ["payload.seed", "integer", "null"]),
    ({"samples": 10, "rounds": 3}, ["unknown key", "'rounds'"]),
])
def test_rejects_bad_payloads(payload, words):
    with pytest.raises(ValidationError) as caught:
        monte_carlo.validate(payload)
    assert caught.value.field == "payload"
    for word in words:
        assert word in caught.value.message
