"""Which time and memory limits a task runs under (qm.limits): the submission's value, else
the task type's default, else the server's; the type's maximum and the worker's caps lower
it; the smallest limit that applies wins; and a time limit must stay below RabbitMQ's
consumer_timeout. The soft timeout is explicit (submission, else task type, else none),
never derived from the time limit, and always below it."""
from __future__ import annotations

import math

import pytest

from qm import limits
from qm.errors import ValidationError
from qm.limits import Limits
from qm.registry import TaskType

CONSUMER_TIMEOUT_S = 1800.0
SERVER_TIMEOUT_S = 600.0


def task_type(**limits_of_type) -> TaskType:
    return TaskType(name="t.limits", handler=lambda payload: payload, **limits_of_type)


def resolve(declared: TaskType, timeout_s: float = 0.0, memory_limit_mb: int = 0, *,
            default_timeout_s: float = SERVER_TIMEOUT_S, default_memory_limit_mb: int = 0,
            consumer_timeout_s: float = CONSUMER_TIMEOUT_S, soft_timeout_s: float = 0.0) -> Limits:
    return limits.resolve(declared, timeout_s, memory_limit_mb, default_timeout_s=default_timeout_s,
                          default_memory_limit_mb=default_memory_limit_mb,
                          consumer_timeout_s=consumer_timeout_s, soft_timeout_s=soft_timeout_s)


# -- resolve: time limit ----------------------------------------------------------------

def test_submission_timeout_wins_over_type_and_server_defaults():
    assert resolve(task_type(default_timeout_s=20), timeout_s=5).timeout_s == 5


def test_type_default_timeout_applies_when_submission_sets_none():
    assert resolve(task_type(default_timeout_s=20)).timeout_s == 20


def test_server_default_timeout_applies_when_submission_and_type_set_none():
    assert resolve(task_type()).timeout_s == SERVER_TIMEOUT_S


@pytest.mark.parametrize("submitted, expected", [(100, 30), (0, 30), (10, 10)])
def test_type_max_timeout_caps_submission_and_defaults(submitted, expected):
    # 0 = the server default (600 s), capped by the type's maximum too
    assert resolve(task_type(max_timeout_s=30), timeout_s=submitted).timeout_s == expected


def test_type_max_caps_type_default():
    assert resolve(task_type(default_timeout_s=50, max_timeout_s=30)).timeout_s == 30


@pytest.mark.parametrize("timeout_s", [CONSUMER_TIMEOUT_S, CONSUMER_TIMEOUT_S + 1, 4000])
def test_timeout_not_below_consumer_timeout_is_refused_saying_how_to_raise_it(timeout_s):
    with pytest.raises(ValidationError) as caught:
        resolve(task_type(), timeout_s=timeout_s)
    assert caught.value.field == "timeout_s"
    message = caught.value.message
    assert "consumer_timeout" in message
    assert "broker.consumer_timeout_s" in message
    assert f"{CONSUMER_TIMEOUT_S:g}" in message


def test_server_default_timeout_at_or_above_consumer_timeout_is_refused_too():
    with pytest.raises(ValidationError) as caught:
        resolve(task_type(), default_timeout_s=3600)
    assert caught.value.field == "timeout_s"


def test_type_max_brings_a_long_submission_below_consumer_timeout():
    assert resolve(task_type(max_timeout_s=100), timeout_s=4000).timeout_s == 100


def test_raised_consumer_timeout_accepts_a_longer_timeout():
    assert resolve(task_type(), timeout_s=4000, consumer_timeout_s=7200).timeout_s == 4000


@pytest.mark.parametrize("timeout_s", [-1.0, -0.001, math.nan, math.inf, -math.inf])
def test_negative_or_non_finite_timeout_is_refused(timeout_s):
    with pytest.raises(ValidationError) as caught:
        resolve(task_type(), timeout_s=timeout_s)
    assert caught.value.field == "timeout_s"


# -- resolve: memory limit --------------------------------------------------------------

def test_submission_memory_limit_wins_over_defaults():
    declared = task_type(default_memory_limit_mb=500)
    assert resolve(declared, memory_limit_mb=100, default_memory_limit_mb=800).memory_limit_mb == 100


def test_type_default_memory_limit_applies_when_submission_sets_none():
    declared = task_type(default_memory_limit_mb=500)
    assert resolve(declared, default_memory_limit_mb=800).memory_limit_mb == 500


def test_server_default_memory_limit_applies_when_submission_and_type_set_none():
    assert resolve(task_type(), default_memory_limit_mb=800).memory_limit_mb == 800


def test_memory_zero_everywhere_means_no_limit():
    resolved = resolve(task_type())
    assert resolved.memory_limit_mb == 0
    assert isinstance(resolved.memory_limit_mb, int)


@pytest.mark.parametrize("submitted, server_default, expected", [(1000, 0, 256), (0, 0, 256), (0, 800, 256),
                                                                 (100, 0, 100)])
def test_type_max_memory_caps_submission_and_defaults(submitted, server_default, expected):
    declared = task_type(max_memory_limit_mb=256)
    assert resolve(declared, memory_limit_mb=submitted,
                   default_memory_limit_mb=server_default).memory_limit_mb == expected


# -- cap: the worker's own caps ---------------------------------------------------------

@pytest.mark.parametrize("task, worker_timeout, worker_memory, expected", [
    (Limits(5.0, 300), 3.0, 200, Limits(3.0, 200)),     # worker caps lower both
    (Limits(2.0, 100), 3.0, 200, Limits(2.0, 100)),     # the task's smaller limits stay
    (Limits(5.0, 300), 0.0, 0, Limits(5.0, 300)),       # 0 = the worker caps nothing
    (Limits(5.0, 0), 0.0, 200, Limits(5.0, 200)),       # a task without memory limit gets the cap
    (Limits(0.0, 0), 0.0, 0, Limits(0.0, 0)),           # nothing applies: no limits
    (Limits(0.0, 0), 7.0, 0, Limits(7.0, 0)),
])
def test_worker_caps_lower_limits_and_the_smallest_wins(task, worker_timeout, worker_memory, expected):
    capped = limits.cap(task, worker_timeout, worker_memory)
    assert capped == expected
    assert isinstance(capped.memory_limit_mb, int)


def test_resolve_then_cap_smallest_of_submission_type_max_and_worker_wins():
    declared = task_type(max_timeout_s=30, max_memory_limit_mb=400)
    resolved = resolve(declared, timeout_s=60, memory_limit_mb=1000)
    assert resolved == Limits(30, 400)
    assert limits.cap(resolved, 20, 500) == Limits(20, 400)
    assert limits.cap(resolved, 40, 300) == Limits(30, 300)


# -- soft timeout -----------------------------------------------------------------------

def test_no_soft_timeout_unless_one_is_set():
    """The time limit is the time the task gets: nothing arms qm.SoftTimeout before it."""
    for timeout_s in (0.0, 1.0, 2.0, 60.0):
        assert resolve(task_type(), timeout_s=timeout_s).soft_timeout_s == 0
    assert resolve(task_type(default_timeout_s=1)).soft_timeout_s == 0


def test_submitted_soft_timeout_wins_over_the_type_s():
    declared = task_type(soft_timeout_s=8)
    assert resolve(declared, timeout_s=10).soft_timeout_s == 8
    assert resolve(declared, timeout_s=10, soft_timeout_s=0.5).soft_timeout_s == 0.5
    assert resolve(task_type(), timeout_s=1, soft_timeout_s=0.5) == Limits(1, 0, 0.5)


@pytest.mark.parametrize("soft_timeout_s, timeout_s", [(1.0, 1.0), (2.0, 1.0), (600.0, 0.0)])
def test_submitted_soft_timeout_not_below_the_time_limit_is_refused_naming_the_field(soft_timeout_s, timeout_s):
    """Checked against the effective limit (here the server's 600 s when timeout_s is 0)."""
    with pytest.raises(ValidationError) as raised:
        resolve(task_type(), timeout_s=timeout_s, soft_timeout_s=soft_timeout_s)
    assert raised.value.field == "soft_timeout_s"
    assert "below" in str(raised.value)


def test_submitted_soft_timeout_is_checked_against_the_type_s_maximum():
    with pytest.raises(ValidationError) as raised:
        resolve(task_type(max_timeout_s=5), timeout_s=60, soft_timeout_s=10)
    assert raised.value.field == "soft_timeout_s"


@pytest.mark.parametrize("bad", [-0.5, math.inf, math.nan])
def test_soft_timeout_must_be_a_positive_number(bad):
    with pytest.raises(ValidationError) as raised:
        resolve(task_type(), timeout_s=10, soft_timeout_s=bad)
    assert raised.value.field == "soft_timeout_s"


@pytest.mark.parametrize("timeout_s", [8.0, 5.0])
def test_type_soft_timeout_not_below_a_shorter_submitted_limit_is_not_armed(timeout_s):
    """The submission's shorter limit is the time the task gets; the type's soft timeout
    would not come before it, so it is dropped rather than refusing the submission."""
    assert resolve(task_type(soft_timeout_s=8), timeout_s=timeout_s) == Limits(timeout_s, 0, 0.0)


def test_a_worker_cap_below_the_soft_timeout_disarms_it():
    assert limits.cap(Limits(10.0, 0, 8.0), 5.0, 0) == Limits(5.0, 0, 0.0)
    assert limits.cap(Limits(10.0, 0, 8.0), 9.0, 0) == Limits(9.0, 0, 8.0)
    assert limits.cap(Limits(10.0, 0, 8.0), 0.0, 0) == Limits(10.0, 0, 8.0)


def test_the_worker_arms_the_soft_timeout_the_server_resolved_and_nothing_else():
    from qm.messages import TaskMessage
    from qm.worker.supervisor import Supervisor

    supervisor = Supervisor(None, None, "w1", ["q"], 1)
    job = supervisor.job_for(TaskMessage("t1", "test.sleep", b"30", "q", timeout_s=1.0))
    assert (job.timeout_s, job.soft_timeout_s) == (1.0, 0)  # 0 = the child never gets qm.SoftTimeout
    job = supervisor.job_for(TaskMessage("t2", "test.soft", b"30", "q", timeout_s=1.0, soft_timeout_s=0.5))
    assert (job.timeout_s, job.soft_timeout_s) == (1.0, 0.5)


def test_soft_timeout_travels_in_the_task_message_and_old_messages_decode_without_one():
    from qm._proto.qm.internal.v1 import messages_pb2
    from qm.messages import TaskMessage

    sent = TaskMessage("t1", "test.soft", b"30", "q", timeout_s=1.0, soft_timeout_s=0.5)
    assert TaskMessage.decode(sent.encode()).soft_timeout_s == 0.5
    old = messages_pb2.TaskMessage(task_id="t0", type="test.sleep", queue="q", timeout_s=1.0)  # no field 10
    assert TaskMessage.decode(old.SerializeToString()).soft_timeout_s == 0.0


def test_a_type_declaring_a_non_positive_soft_timeout_is_refused():
    from qm import registry

    loaded = registry.validate([task_type(soft_timeout_s=0), task_type(soft_timeout_s=-1)])
    assert not loaded.types and len(loaded.errors) == 2
    assert all("soft_timeout_s" in str(error) for error in loaded.errors)
