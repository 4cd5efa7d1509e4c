"""``examples.hash_chain``: iterated SHA-256.

Payload (text codec): ``"ROUNDS:SEED"``: ROUNDS a decimal integer from 1 to 50,000,000,
SEED the rest of the payload after the first ``:`` (it may contain ``:``), non-empty, at
most 1 KiB as UTF-8. Result (text): the lowercase hex digest of

    d1 = sha256(SEED), d2 = sha256(d1), ..., dROUNDS

where each round hashes the previous round's raw 32-byte digest. One round is
``hashlib.sha256(seed.encode()).hexdigest()``.

It reports progress (``qm.progress``) every PROGRESS_EVERY_ROUNDS rounds: ``qm watch``
shows a bar, ``qm status`` the fraction and "round N of M"; the qm runtime keeps at most
10 updates a second, so reporting often costs nothing but the call.

Nothing here needs cleaning up, so the handler lets ``qm.SoftTimeout`` propagate: the
task ends TIMED_OUT at its soft limit instead of waiting for the hard kill.
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable

import qm
from qm.errors import ValidationError
from qm.registry import TaskType
from qm_examples._payload import checked

#: Largest accepted ROUNDS.
MAX_ROUNDS = 50_000_000
#: Largest accepted SEED, bytes of UTF-8.
MAX_SEED_BYTES = 1024
#: Rounds between two progress reports (~50 ms of hashing on one core).
PROGRESS_EVERY_ROUNDS = 100_000
_ROUNDS_RE = re.compile(r"[0-9]+", re.ASCII)


def parse(payload: str) -> tuple[int, bytes]:
    """"ROUNDS:SEED" → (rounds, seed as UTF-8); ValidationError names the problem."""
    if not isinstance(payload, str):
        raise ValidationError("payload",
                              f"must be text \"ROUNDS:SEED\", got {type(payload).__name__}")
    rounds_text, colon, seed = payload.partition(":")
    if not colon:
        raise ValidationError("payload", 'must be "ROUNDS:SEED", e.g. "1000000:hello"; no ":" found')
    if not _ROUNDS_RE.fullmatch(rounds_text):
        raise ValidationError("payload", f"ROUNDS (before the first ':') must be a decimal integer from 1 to "
                                         f"{MAX_ROUNDS:_}, got {rounds_text[:20]!r}")
    # Compare lengths first: int() of a huge digit string is slow (and limited).
    rounds = int(rounds_text) if len(rounds_text) <= len(str(MAX_ROUNDS)) else MAX_ROUNDS + 1
    if not 1 <= rounds <= MAX_ROUNDS:
        shown = rounds_text if len(rounds_text) <= 20 else rounds_text[:20] + "..."
        raise ValidationError("payload", f"ROUNDS must be from 1 to {MAX_ROUNDS:_}, got {shown}")
    seed_bytes = seed.encode("utf-8")
    if not seed_bytes:
        raise ValidationError("payload", "SEED (after the first ':') is empty; give 1 to 1024 bytes")
    if len(seed_bytes) > MAX_SEED_BYTES:
        raise ValidationError("payload", f"SEED is {len(seed_bytes)} bytes of UTF-8; "
                                         f"at most {MAX_SEED_BYTES} are accepted")
    return rounds, seed_bytes


def validate(payload: str) -> None:
    """Runs in qm-server at submit."""
    parse(payload)


def hash_chain(seed: bytes, rounds: int, report: Callable[[int], None] | None = None) -> str:
    """Hex digest after `rounds` rounds of SHA-256, starting from `seed`; `report(done)`
    is called after every PROGRESS_EVERY_ROUNDS rounds."""
    digest = seed
    sha256 = hashlib.sha256
    done = 0
    while done < rounds:
        block = min(PROGRESS_EVERY_ROUNDS, rounds - done)
        for _ in range(block):
            digest = sha256(digest).digest()
        done += block
        if report is not None:
            report(done)
    return digest.hex()


def run(payload: str) -> str:
    """Handler: runs in a worker child on the decoded text payload."""
    checked(validate, payload)
    rounds, seed = parse(payload)
    return hash_chain(seed, rounds, lambda done: qm.progress(done / rounds, f"round {done:,} of {rounds:,}"))


TASK_TYPE = TaskType(
    name="examples.hash_chain",
    handler=run,
    codec="text",
    validate=validate,
    description='Iterated SHA-256 of SEED, ROUNDS times (1..50,000,000): "ROUNDS:SEED" -> hex digest',
    default_timeout_s=120,
    max_timeout_s=900,
    default_memory_limit_mb=256,
)
