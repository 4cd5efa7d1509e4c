"""``examples.primes``: count the primes below N with a segmented sieve.

Payload (json codec): ``{"below": N}`` with 2 ≤ N ≤ 50,000,000.
Result (json): ``{"below": N, "count": C}``, e.g. ``{"below": 100, "count": 25}``.

Pure Python: a sieve of Eratosthenes over odd numbers only, one ``bytearray`` segment of
SEGMENT_ODDS numbers at a time (so memory stays small whatever N is), crossing off
multiples of each base prime with one slice assignment per prime and segment (the
crossing-off runs in C, so N = 50 million takes well under a second on one core).
"""
from __future__ import annotations

import math

from qm.registry import TaskType
from qm.retry import RetryPolicy
from qm_examples._payload import checked, integer, json_object

#: Largest accepted N.
MAX_BELOW = 50_000_000
#: Odd numbers per sieve segment (one byte each).
SEGMENT_ODDS = 1 << 18


def validate(payload: object) -> None:
    """Runs in qm-server at submit: {"below": integer 2..50,000,000} and nothing else."""
    obj = json_object(payload, '{"below": 1000000}', ("below",))
    integer(obj, "below", 2, MAX_BELOW)


def count_primes_below(n: int, segment_odds: int = SEGMENT_ODDS) -> int:
    """The number of primes p with p < n."""
    if n <= 2:
        return 0
    count = 1  # the prime 2; the sieve below covers the odd numbers 3, 5, ... < n
    base_primes = _odd_primes_up_to(math.isqrt(n - 1))
    low = 3
    while low < n:
        high = min(low + 2 * segment_odds, n)   # this segment: odd numbers in [low, high)
        size = (high - low + 1) // 2             # index i stands for low + 2 * i
        segment = bytearray(b"\x01") * size
        for p in base_primes:
            square = p * p
            if square >= high:
                break
            # First odd multiple of p in the segment, never below p*p (smaller ones have a
            # smaller prime factor; this also keeps p itself).
            start = max(square, (low + p - 1) // p * p)
            if start % 2 == 0:
                start += p
            index = (start - low) // 2
            if index < size:
                segment[index::p] = bytes(len(range(index, size, p)))
        count += segment.count(1)
        low = high + 1 if high % 2 == 0 else high
    return count


def _odd_primes_up_to(limit: int) -> list[int]:
    """Odd primes ≤ limit, by a plain sieve (limit is at most √N ≈ 7,071)."""
    if limit < 3:
        return []
    sieve = bytearray(b"\x01") * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit) + 1):
        if sieve[p]:
            sieve[p * p::p] = bytes(len(range(p * p, limit + 1, p)))
    return [p for p in range(3, limit + 1, 2) if sieve[p]]


def run(payload: dict) -> dict:
    """Handler: runs in a worker child on the decoded JSON payload."""
    checked(validate, payload)
    below = payload["below"]
    return {"below": below, "count": count_primes_below(below)}


TASK_TYPE = TaskType(
    name="examples.primes",
    handler=run,
    codec="json",
    validate=validate,
    description='Count the primes below N (2..50,000,000) with a segmented sieve: {"below": N}',
    default_timeout_s=60,
    max_timeout_s=600,
    default_memory_limit_mb=512,
    max_memory_limit_mb=2048,
    # One more attempt, a few seconds later, after FAILED or CRASHED (say the host's OOM
    # killer took the child). Bad payloads raise qm.PermanentError and never retry.
    retry=RetryPolicy(max_retries=1, backoff_s=5.0),
)
