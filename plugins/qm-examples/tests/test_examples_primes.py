"""examples.primes: results, validation, and the handler called as a plain function."""
import pytest
from qm_examples import primes

import qm
from qm.errors import ValidationError


def trial_division_count(n: int) -> int:
    return sum(1 for k in range(2, n) if all(k % d for d in range(2, int(k**0.5) + 1)))


@pytest.mark.parametrize("below, count", [(2, 0), (3, 1), (4, 2), (10, 4), (11, 4), (12, 5), (100, 25),
                                          (1_000_000, 78_498)])
def test_known_counts(below, count):
    assert primes.count_primes_below(below) == count


@pytest.mark.parametrize("segment_odds", [1, 2, 3, 7, 64])
def test_small_segments_agree_with_trial_division(segment_odds):
    for n in range(2, 400):
        assert primes.count_primes_below(n, segment_odds) == trial_division_count(n), n


def test_handler_returns_json_object():
    assert primes.run({"below": 100}) == {"below": 100, "count": 25}


def test_task_type_round_trip_through_the_codec():
    payload = primes.TASK_TYPE.decode_payload(b'{"below": 1000}')
    result = primes.TASK_TYPE.encode_result(primes.TASK_TYPE.handler(payload))
    assert result == b'{"below": 1000, "count": 168}'


@pytest.mark.parametrize("below", [2, 50_000_000])
def test_accepts_bounds(below):
    primes.validate({"below": below})


@pytest.mark.parametrize("payload, words", [
    ([1000], ["JSON object", "an array"]),
    (1000, ["JSON object", "an integer"]),
    ("1000", ["JSON object", "a string"]),
    (None, ["JSON object", "null"]),
    ({}, ["payload.below", "missing"]),
    ({"below": 1.5}, ["payload.below", "integer", "1.5"]),
    ({"below": 1e6}, ["payload.below", "integer"]),
    ({"below": True}, ["payload.below", "integer", "boolean"]),
    ({"below": "100"}, ["payload.below", "integer", "string"]),
    ({"below": 1}, ["payload.below", "2", "50_000_000", "got 1"]),
    ({"below": -5}, ["payload.below", "got -5"]),
    ({"below": 50_000_001}, ["payload.below", "50_000_000", "got 50000001"]),
    ({"below": 100, "limit": 3}, ["unknown key", "'limit'"]),
])
def test_rejects_bad_payloads(payload, words):
    with pytest.raises(ValidationError) as caught:
        primes.validate(payload)
    assert caught.value.field == "payload"
    for word in words:
        assert word in caught.value.message


def test_server_side_check_rejects_invalid_json():
    with pytest.raises(ValidationError) as caught:
        primes.TASK_TYPE.check_payload(b'{"below": ')
    assert caught.value.field == "payload"
    assert "not valid json" in caught.value.message


def test_server_side_check_runs_the_validator():
    with pytest.raises(ValidationError, match="payload.below"):
        primes.TASK_TYPE.check_payload(b'{"below": 0}')


def test_handler_fails_permanently_on_a_bad_payload():
    with pytest.raises(qm.PermanentError, match="payload.below"):
        primes.run({"below": 0})


def test_declaration():
    declared = primes.TASK_TYPE
    assert (declared.name, declared.codec) == ("examples.primes", "json")
    limits = (declared.default_timeout_s, declared.max_timeout_s, declared.default_memory_limit_mb)
    assert limits == (60, 600, 512)
    assert declared.description and "\n" not in declared.description
