"""qm.testing.run_task / qm run: a task through the real child-process pool, no broker."""
from __future__ import annotations

import time

import pytest

from qm.errors import UnknownTaskType, ValidationError
from qm.testing import run_task


def test_a_task_runs_in_a_child_and_returns_its_decoded_result():
    result = run_task("math", "2 ** 10")

    assert (result.state, result.value, result.error) == ("SUCCEEDED", "1024", "")
    assert result.timeout_s == 600.0  # no limit given: the default a server would apply


#: What a local run costs besides the task: starting its child (spawn: a fresh interpreter
#: importing the plugins), and after a kill starting the replacement the pool stop then
#: ends. Generous for a loaded machine; the precise deadline is tests/unit/test_pool.py's.
LOCAL_RUN_OVERHEAD_S = 15.0


def test_the_hard_time_limit_is_enforced():
    started = time.monotonic()
    result = run_task("test.stubborn", "60", timeout_s=1.0)
    took_s = time.monotonic() - started

    assert result.state == "TIMED_OUT"
    assert "1 s" in result.error
    # a task that ignores every signal and spins 60 s is ended at its 1 s limit
    assert took_s < 1.0 + LOCAL_RUN_OVERHEAD_S, f"the local run took {took_s:.1f} s"


def test_the_memory_limit_is_enforced():
    result = run_task("test.alloc", "2048", memory_limit_mb=128)

    assert result.state == "MEMORY_EXCEEDED"
    assert "128 MiB" in result.error


def test_a_raising_task_fails_with_its_exception_text():
    result = run_task("test.fail", "boom")

    assert result.state == "FAILED"
    assert result.error.startswith("RuntimeError: boom")


def test_bad_payloads_and_types_are_refused_before_anything_runs():
    with pytest.raises(ValidationError) as error:
        run_task("math", "1 +")
    assert error.value.field == "payload"
    with pytest.raises(UnknownTaskType):
        run_task("no.such.type", "x")


def test_a_soft_timeout_is_given_only_when_asked_for_and_the_task_may_clean_up():
    """test.soft sleeps and returns 'cleaned up' on qm.SoftTimeout: without soft_timeout_s
    it never gets one (the hard kill ends it); with one it cleans up and SUCCEEDS."""
    killed = run_task("test.soft", "60", timeout_s=1.0)
    assert (killed.state, killed.soft_timeout_s) == ("TIMED_OUT", 0.0)
    assert "SoftTimeout" not in killed.error, killed.error

    cleaned = run_task("test.soft", "60", timeout_s=30.0, soft_timeout_s=0.5)
    assert (cleaned.state, cleaned.value, cleaned.soft_timeout_s) == ("SUCCEEDED", "cleaned up", 0.5)


def test_a_soft_timeout_not_below_the_time_limit_is_refused_as_the_server_would():
    with pytest.raises(ValidationError) as error:
        run_task("test.soft", "1", timeout_s=1.0, soft_timeout_s=1.0)
    assert error.value.field == "soft_timeout_s"
