"""The retry policy (qm.retry): which outcomes retry and within what budget, how long the
next attempt waits (exponential, capped, jittered into [0.5, 1] of the delay), which wait
tier a delay runs in, and how a submission's options, the task type's policy and the
server's default combine, with errors that name the field at fault."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qm import retry
from qm.errors import ValidationError
from qm.registry import TaskType
from qm.retry import DELAY_TIERS_S, MAX_RETRIES_LIMIT, RetryPolicy, tier_for
from qm.states import TaskState

SERVER_DEFAULT = RetryPolicy(max_retries=1, backoff_s=7.0, backoff_max_s=70.0, jitter=True, on_timeout=False)
TYPE_POLICY = RetryPolicy(max_retries=5, backoff_s=3.0, backoff_max_s=30.0, jitter=False, on_timeout=True)


def task_type(retry_policy: RetryPolicy | None = None) -> TaskType:
    return TaskType(name="t.retry", handler=lambda payload: payload, retry=retry_policy)


# -- covers / retries: which outcomes, what budget ---------------------------------------

@pytest.mark.parametrize("state", [TaskState.FAILED, TaskState.CRASHED])
@pytest.mark.parametrize("on_timeout", [False, True])
def test_failed_and_crashed_are_retried(state, on_timeout):
    policy = RetryPolicy(max_retries=2, on_timeout=on_timeout)
    assert policy.covers(state)
    assert policy.retries(state, attempt=1)


def test_timed_out_is_retried_only_with_on_timeout():
    assert not RetryPolicy(max_retries=2).covers(TaskState.TIMED_OUT)
    assert not RetryPolicy(max_retries=2).retries(TaskState.TIMED_OUT, attempt=1)
    assert RetryPolicy(max_retries=2, on_timeout=True).covers(TaskState.TIMED_OUT)
    assert RetryPolicy(max_retries=2, on_timeout=True).retries(TaskState.TIMED_OUT, attempt=1)


@pytest.mark.parametrize("state", [TaskState.MEMORY_EXCEEDED, TaskState.CANCELLED, TaskState.SUCCEEDED])
@pytest.mark.parametrize("on_timeout", [False, True])
def test_memory_exceeded_cancelled_and_succeeded_are_never_retried(state, on_timeout):
    policy = RetryPolicy(max_retries=MAX_RETRIES_LIMIT, on_timeout=on_timeout)
    assert not policy.covers(state)
    assert not any(policy.retries(state, attempt) for attempt in range(1, 5))


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_budget_allows_exactly_max_retries_retries(max_retries):
    policy = RetryPolicy(max_retries=max_retries)
    retried = [attempt for attempt in range(1, max_retries + 5) if policy.retries(TaskState.FAILED, attempt)]
    # attempts 1..max_retries get another one; attempt max_retries + 1 is the last
    assert retried == list(range(1, max_retries + 1))


def test_budget_applies_to_timeouts_too():
    policy = RetryPolicy(max_retries=2, on_timeout=True)
    assert policy.retries(TaskState.TIMED_OUT, attempt=2)
    assert not policy.retries(TaskState.TIMED_OUT, attempt=3)


# -- delay_s: exponential, capped, jittered ----------------------------------------------

def test_delay_doubles_from_the_backoff():
    policy = RetryPolicy(backoff_s=1.5, backoff_max_s=1000.0, jitter=False)
    assert [policy.delay_s(attempt) for attempt in range(1, 6)] == [1.5, 3.0, 6.0, 12.0, 24.0]


def test_delay_is_capped_at_backoff_max():
    policy = RetryPolicy(backoff_s=1.0, backoff_max_s=5.0, jitter=False)
    assert [policy.delay_s(attempt) for attempt in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay_s(60) == 5.0  # no overflow for a late attempt


def test_zero_backoff_means_no_delay():
    assert RetryPolicy(backoff_s=0.0, jitter=False).delay_s(3) == 0.0


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("attempt", [1, 2, 4, 12])
def test_jitter_scales_the_delay_into_half_to_full(seed, attempt):
    plain = RetryPolicy(backoff_s=2.0, backoff_max_s=100.0, jitter=False).delay_s(attempt)
    jittered = RetryPolicy(backoff_s=2.0, backoff_max_s=100.0, jitter=True).delay_s(attempt, random.Random(seed))
    assert 0.5 * plain <= jittered <= plain


def test_jitter_is_drawn_from_the_given_generator():
    policy = RetryPolicy(backoff_s=4.0, jitter=True)
    assert policy.delay_s(2, random.Random(7)) == policy.delay_s(2, random.Random(7))
    delays = {policy.delay_s(2, random.Random(seed)) for seed in range(20)}
    assert len(delays) > 1, "jitter never varies the delay"


def test_without_jitter_the_generator_is_not_used():
    rng = random.Random(3)
    state = rng.getstate()
    assert RetryPolicy(backoff_s=4.0, jitter=False).delay_s(2, rng) == 8.0
    assert rng.getstate() == state


# -- tier_for: the wait queue a delay runs in --------------------------------------------

@pytest.mark.parametrize("delay_s, tier_s", [
    (0.0, 1), (0.4, 1), (1.0, 1), (1.99, 1), (2.0, 2), (4.99, 2), (5.0, 5), (29.0, 10), (30.0, 30),
    (3599.0, 1800), (3600.0, 3600), (86400.0, 3600),
])
def test_tier_is_the_longest_not_above_the_delay(delay_s, tier_s):
    assert tier_for(delay_s) == tier_s


def test_every_tier_maps_to_itself():
    assert [tier_for(tier) for tier in DELAY_TIERS_S] == list(DELAY_TIERS_S)


@given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
def test_tier_never_waits_longer_than_asked_unless_below_the_first_tier(delay_s):
    tier = tier_for(delay_s)
    assert tier in DELAY_TIERS_S
    if delay_s < DELAY_TIERS_S[0]:
        assert tier == DELAY_TIERS_S[0]
    else:
        assert tier <= delay_s
        assert not [longer for longer in DELAY_TIERS_S if tier < longer <= delay_s]


# -- resolve: submission > task type > server default ------------------------------------

def test_server_default_applies_when_type_and_submission_set_nothing():
    assert retry.resolve(task_type(), SERVER_DEFAULT) == SERVER_DEFAULT


def test_type_policy_beats_the_server_default():
    assert retry.resolve(task_type(TYPE_POLICY), SERVER_DEFAULT) == TYPE_POLICY


def test_submission_beats_the_type_policy_field_by_field():
    policy = retry.resolve(task_type(TYPE_POLICY), SERVER_DEFAULT, max_retries=2, jitter=True)
    assert policy == RetryPolicy(max_retries=2, backoff_s=3.0, backoff_max_s=30.0, jitter=True, on_timeout=True)


def test_submission_beats_the_server_default_field_by_field():
    policy = retry.resolve(task_type(), SERVER_DEFAULT, backoff_s=0.5, backoff_max_s=4.0, on_timeout=True)
    assert policy == RetryPolicy(max_retries=1, backoff_s=0.5, backoff_max_s=4.0, jitter=True, on_timeout=True)


def test_explicit_zero_and_false_in_a_submission_are_not_unset():
    policy = retry.resolve(task_type(TYPE_POLICY), SERVER_DEFAULT, max_retries=0, backoff_s=0.0,
                           jitter=False, on_timeout=False)
    assert policy.max_retries == 0
    assert policy.backoff_s == 0.0
    assert policy.jitter is False
    assert policy.on_timeout is False


def test_hundred_retries_is_the_largest_budget_accepted():
    assert retry.resolve(task_type(), SERVER_DEFAULT, max_retries=MAX_RETRIES_LIMIT).max_retries == 100


def test_more_than_a_hundred_retries_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as caught:
        retry.resolve(task_type(), SERVER_DEFAULT, max_retries=MAX_RETRIES_LIMIT + 1)
    assert caught.value.field == "max_retries"
    assert "101" in str(caught.value) and "100" in str(caught.value)


def test_a_type_policy_over_the_limit_is_refused_too():
    with pytest.raises(ValidationError) as caught:
        retry.resolve(task_type(RetryPolicy(max_retries=500)), SERVER_DEFAULT)
    assert caught.value.field == "max_retries"


@pytest.mark.parametrize("option, field", [("backoff_s", "retry_backoff_s"),
                                           ("backoff_max_s", "retry_backoff_max_s")])
@pytest.mark.parametrize("value", [-1.0, -0.001, math.inf, math.nan])
def test_negative_or_non_finite_backoff_is_refused_naming_the_field(option, field, value):
    with pytest.raises(ValidationError) as caught:
        retry.resolve(task_type(), SERVER_DEFAULT, **{option: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert "non-negative" in caught.value.message
