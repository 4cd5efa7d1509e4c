"""examples.hash_chain: results, validation, and SoftTimeout left to propagate."""
import hashlib
import signal

import pytest
from qm_examples import hash_chain

import qm
from qm.errors import ValidationError
from qm.registry import Registry


def test_one_round_is_sha256_of_the_seed():
    assert hash_chain.run("1:hello") == hashlib.sha256(b"hello").hexdigest()


def test_three_rounds_hash_the_raw_digest_each_time():
    digest = b"seed value"
    for _ in range(3):
        digest = hashlib.sha256(digest).digest()
    assert hash_chain.run("3:seed value") == digest.hex()


def test_seed_is_everything_after_the_first_colon():
    assert hash_chain.run("1:a:b") == hashlib.sha256(b"a:b").hexdigest()


def test_seed_is_utf8():
    expected = hashlib.sha256(hashlib.sha256("héllo".encode()).digest()).hexdigest()
    assert hash_chain.run("2:héllo") == expected


def test_result_is_text_through_the_codec():
    declared = hash_chain.TASK_TYPE
    value = declared.handler(declared.decode_payload(b"1:x"))
    assert declared.encode_result(value) == hashlib.sha256(b"x").hexdigest().encode()


@pytest.mark.parametrize("payload", ["1:x", "50000000:x", "00001:x", "1:" + "s" * 1024, "1:" + "é" * 512])
def test_accepts_bounds(payload):
    hash_chain.validate(payload)


@pytest.mark.parametrize("payload, words", [
    ("1000", ["ROUNDS:SEED", 'no ":" found']),
    ("", ["ROUNDS:SEED"]),
    ("abc:x", ["ROUNDS", "decimal integer", "'abc'"]),
    (":x", ["ROUNDS", "decimal integer"]),
    (" 5:x", ["ROUNDS", "decimal integer"]),
    ("+5:x", ["ROUNDS", "decimal integer"]),
    ("1.5:x", ["ROUNDS", "decimal integer"]),
    ("\u00b2:x", ["ROUNDS", "decimal integer"]),
    ("0:x", ["ROUNDS", "from 1 to 50_000_000", "got 0"]),
    ("50000001:x", ["ROUNDS", "got 50000001"]),
    ("9" * 5000 + ":x", ["ROUNDS", "from 1 to 50_000_000", "..."]),
    ("5:", ["SEED", "empty"]),
    ("5:" + "s" * 1025, ["SEED", "1025 bytes", "1024"]),
    ("5:" + "é" * 513, ["SEED", "1026 bytes"]),
])
def test_rejects_bad_payloads(payload, words):
    with pytest.raises(ValidationError) as caught:
        hash_chain.validate(payload)
    assert caught.value.field == "payload"
    for word in words:
        assert word in caught.value.message


def test_handler_fails_permanently_on_a_bad_payload():
    with pytest.raises(qm.PermanentError, match="ROUNDS"):
        hash_chain.run("zero:x")


def test_soft_timeout_propagates_and_ends_the_task_timed_out():
    """In a worker child, SIGALRM raises qm.SoftTimeout; the handler does not catch it."""
    from qm.worker import child
    from qm.worker.jobs import ReplyKind

    registry = Registry({hash_chain.TASK_TYPE.name: hash_chain.TASK_TYPE})
    previous = signal.signal(signal.SIGALRM, child._raise_soft_timeout)
    try:
        reply = child.run_limited(registry, "examples.hash_chain", b"50000000:x", 0.2, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert reply.kind is ReplyKind.SOFT_TIMEOUT
    assert "SoftTimeout" in reply.value


def test_it_reports_progress_round_by_round_in_a_worker_child():
    """qm run / a worker see "round N of M" updates, in order, from the child."""
    from qm.testing import run_task

    seen = []
    rounds = 6 * hash_chain.PROGRESS_EVERY_ROUNDS
    result = run_task("examples.hash_chain", f"{rounds}:x", on_progress=seen.append)
    assert result.succeeded and result.value == hash_chain.hash_chain(b"x", rounds)
    assert seen, "no progress reached the caller"
    assert [update.fraction for update in seen] == sorted(update.fraction for update in seen)
    for update in seen:
        done = round(update.fraction * rounds)
        assert update.message == f"round {done:,} of {rounds:,}" and done % hash_chain.PROGRESS_EVERY_ROUNDS == 0


def test_outside_a_worker_the_handler_runs_and_its_reports_go_nowhere():
    assert hash_chain.run(f"{hash_chain.PROGRESS_EVERY_ROUNDS + 1}:x") == hash_chain.hash_chain(
        b"x", hash_chain.PROGRESS_EVERY_ROUNDS + 1)
