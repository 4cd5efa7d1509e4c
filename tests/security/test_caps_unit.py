"""The caps' own rules, without a network: queue allow-list, server maxima, the token
bucket on a fake clock, the caller key, the validator budget, the worker's result cap and
the bounded publish retries. The same caps against a real server: test_limits.py,
test_caps_rate.py.
"""
from __future__ import annotations

import asyncio
import threading
import types

import pytest

from qm.broker import base, topology
from qm.broker.memory import MemoryBroker
from qm.config import load_config
from qm.errors import ConfigError, QueueFull, ValidationError, ValidatorsBusy
from qm.limits import resolve
from qm.messages import TaskMessage
from qm.metrics import WorkerMetrics
from qm.registry import TaskType
from qm.server import app as server_app
from qm.server.caps import SubmitCaps
from qm.server.quotas import SubmitRateLimiter, caller_key
from qm.server.validators import PayloadValidators
from qm.states import TaskState
from qm.worker.outcomes import Outcomes
from qm.worker.pool import Outcome
from tests.unit.aio import run, within

# -- queues and maxima ------------------------------------------------------------------

@pytest.mark.parametrize("queue", ["default", "batch.eu", "batch.us-2"])
def test_listed_queues_and_patterns_are_accepted(queue):
    SubmitCaps(("default", "batch.*")).check_queue(queue)


@pytest.mark.parametrize("queue, says", [
    ("other", "server.queues"), ("batch", "server.queues"), ("default\n", "not a valid queue name"),
    ("batch.eu\n", "not a valid queue name"), ("de fault", "not a valid queue name"), ("", "not a valid")])
def test_other_queues_and_names_with_trailing_characters_are_refused(queue, says):
    with pytest.raises(ValidationError) as refused:
        SubmitCaps(("default", "batch.*")).check_queue(queue)
    assert refused.value.field == "queue" and says in refused.value.message


def test_the_default_configuration_accepts_only_the_default_queue():
    queues = load_config(None, env={}).server.queues
    SubmitCaps(queues).check_queue("default")
    with pytest.raises(ValidationError):
        SubmitCaps(queues).check_queue("anything")


def test_a_bad_queue_pattern_stops_start_up():
    with pytest.raises(ConfigError) as bad:
        load_config(None, env={"QM_SERVER__QUEUES": "default,bad name"})
    assert bad.value.path == "server.queues"


def test_requested_values_over_the_maxima_are_refused_naming_field_and_key():
    caps = SubmitCaps(max_timeout_s=60, max_memory_limit_mb=512, max_retries=3)
    for args, field, key in (((61.0, 0, {}), "timeout_s", "server.max_task_timeout_s"),
                             ((0.0, 513, {}), "memory_limit_mb", "server.max_task_memory_limit_mb"),
                             ((0.0, 0, {"max_retries": 4}), "max_retries", "server.max_retries")):
        with pytest.raises(ValidationError) as refused:
            caps.check_requested(*args)
        assert refused.value.field == field and key in refused.value.message
    caps.check_requested(60.0, 512, {"max_retries": 3, "backoff_s": None})


def test_defaults_over_the_maxima_are_brought_down_and_no_limit_becomes_the_maximum():
    generous = TaskType("generous", lambda payload: payload, default_timeout_s=600, default_memory_limit_mb=4096)
    limits = resolve(generous, 0.0, 0, default_timeout_s=600, default_memory_limit_mb=0, consumer_timeout_s=1800,
                     max_timeout_s=60, max_memory_limit_mb=512)
    assert (limits.timeout_s, limits.memory_limit_mb) == (60, 512)
    plain = TaskType("plain", lambda payload: payload)
    unlimited = resolve(plain, 0.0, 0, default_timeout_s=30, default_memory_limit_mb=0, consumer_timeout_s=1800,
                        max_memory_limit_mb=512)
    assert unlimited.memory_limit_mb == 512
    assert SubmitCaps(max_retries=3).retries(10) == 3 and SubmitCaps().retries(10) == 10


def test_a_burst_below_the_batch_size_stops_start_up():
    config = load_config(None, env={"QM_SERVER__SUBMIT_BURST": "100", "QM_SERVER__MAX_BATCH_ITEMS": "200"})
    with pytest.raises(ConfigError) as bad:
        server_app.check_caps(config)
    assert bad.value.path == "server.submit_burst"
    server_app.check_caps(load_config(None, env={}))


# -- the submit rate limit --------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_a_caller_gets_its_burst_then_the_rate_and_is_told_how_long_to_wait():
    clock = FakeClock()
    limiter = SubmitRateLimiter(rate_per_s=10, burst=20, clock=clock)
    assert [limiter.take("a", 1) for _ in range(20)] == [0.0] * 20
    assert limiter.take("a", 1) == pytest.approx(0.1)
    assert limiter.take("a", 5) == pytest.approx(0.5)  # a batch waits for all its tokens
    clock.now_s += 0.5
    assert limiter.take("a", 5) == 0.0
    assert limiter.take("b", 20) == 0.0, "each caller has its own bucket"
    clock.now_s += 3600
    assert limiter.take("a", 20) == 0.0 and limiter.take("a", 1) > 0, "a bucket never holds more than the burst"


def test_rate_zero_is_no_limit_and_forgotten_callers_start_full():
    assert SubmitRateLimiter(0, 1).take("a", 10_000) == 0.0
    clock = FakeClock()
    limiter = SubmitRateLimiter(rate_per_s=1, burst=1, clock=clock, max_callers=2)
    for caller in ("a", "b", "c"):
        assert limiter.take(caller, 1) == 0.0
    assert len(limiter._buckets) == 2  # "a" was forgotten: memory stays bounded
    assert limiter.take("a", 1) == 0.0 and limiter.take("c", 1) > 0


@pytest.mark.parametrize("peer, key", [
    ("ipv4:10.0.0.5:51234", "ipv4:10.0.0.5"), ("ipv6:[::1]:40000", "ipv6:[::1]"),
    ("unix:/run/qm.sock", "unix:/run/qm.sock")])
def test_without_authentication_the_caller_is_the_peer_address_without_its_port(peer, key):
    assert caller_key(types.SimpleNamespace(peer=lambda: peer)) == key


def test_with_authentication_the_caller_is_the_principal(monkeypatch):
    import sys

    auth = types.ModuleType("qm.server.auth")
    auth.current_principal = lambda: "token:ci-bot"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qm.server.auth", auth)
    assert caller_key(types.SimpleNamespace(peer=lambda: "ipv4:10.0.0.5:1")) == "principal:token:ci-bot"


# -- validators off the loop, within a budget -------------------------------------------

#: A task type whose (quick) validator runs on a validator thread.
FINE = TaskType("fine", lambda payload: payload, validate=lambda payload: None)


def _blocking_type(release: threading.Event) -> TaskType:
    return TaskType("blocking", lambda payload: payload, validate=lambda payload: release.wait(10))


def test_a_validator_over_budget_is_refused_while_the_loop_keeps_serving():
    release = threading.Event()

    async def body():
        validators = PayloadValidators(timeout_s=0.2, threads=1)
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        try:
            with pytest.raises(ValidationError) as slow:
                await validators.check(_blocking_type(release), b"x")
            assert "server.validate_timeout_s" in slow.value.message
            assert ticks > 1, "the event loop was blocked by the validator"
            with pytest.raises(ValidatorsBusy):  # its only thread is still held by the runaway
                await validators.check(FINE, b"x")
            release.set()

            async def thread_back():
                while validators.overdue:  # the runaway returns once released
                    await asyncio.sleep(0.01)

            await within(thread_back())
            await validators.check(FINE, b"x")
        finally:
            release.set()
            ticker.cancel()
            validators.close()

    run(body)


def test_a_batch_waits_for_the_threads_instead_of_being_refused():
    """Checks within their budget are queued for: 150 items of 20 ms on one thread with a
    1 s budget all pass, though together they take three times the budget."""
    def takes_20_ms(payload):
        threading.Event().wait(0.02)

    async def body():
        validators = PayloadValidators(timeout_s=1.0, threads=1)
        try:
            quick = TaskType("quick", lambda p: p, validate=takes_20_ms)
            await asyncio.gather(*(validators.check(quick, b"x") for _ in range(150)))
        finally:
            validators.close()

    run(body)


def test_a_validator_raising_anything_is_a_clear_payload_refusal():
    def broken(payload):
        raise KeyError("oops")

    async def body():
        validators = PayloadValidators()
        try:
            with pytest.raises(ValidationError) as refused:
                await validators.check(TaskType("broken", lambda p: p, validate=broken), b"x")
            assert refused.value.field == "payload" and "KeyError" in refused.value.message
            with pytest.raises(ValidationError) as deep:
                await validators.check(TaskType("j", lambda p: p, codec="json"), b"[" * 100_000 + b"]" * 100_000)
            assert "nested" in deep.value.message
        finally:
            validators.close()

    run(body)


# -- the worker's result cap and bounded publish retries --------------------------------

def test_a_result_over_the_cap_ends_the_task_failed_for_good():
    outcomes = Outcomes(MemoryBroker(), "w1", WorkerMetrics(), max_result_bytes=10)
    message = TaskMessage("t1", "test.echo", b"", "default", 1, 0.0, 5.0, 0)
    fits = Outcome(TaskState.SUCCEEDED, result=b"x" * 10)
    assert outcomes._capped(message, fits) is fits
    capped = outcomes._capped(message, Outcome(TaskState.SUCCEEDED, result=b"x" * 11))
    assert capped.state is TaskState.FAILED and capped.permanent and not capped.result
    assert "11 bytes" in capped.error and "worker.max_result_bytes" in capped.error


def test_a_refused_publish_is_retried_for_a_bounded_time(monkeypatch):
    """A nack while connected (a full queue; a quorum queue without a leader) is tried
    again with a growing pause, and raised once MAX_REFUSED_S of refusals have passed."""
    monkeypatch.setattr(base, "REFUSED_BACKOFF_S", 0.001)
    monkeypatch.setattr(base, "MAX_REFUSED_S", 0.05)

    class Refusing(MemoryBroker):
        tries = 0

        async def publish(self, *args, **kwargs):
            self.tries += 1
            raise QueueFull("full")

    async def body():
        broker = Refusing()
        await broker.connect()
        with pytest.raises(QueueFull):
            await within(base.publish_until_confirmed(broker, "x", "", b"", {}, "task t1"))
        assert 2 <= broker.tries < 100

    run(body)


def test_work_queue_arguments_cap_the_length_with_reject_publish():
    for queue_type in ("quorum", "classic"):
        arguments = topology.work_queue_arguments(queue_type, 5, max_length=100)
        assert arguments["x-max-length"] == 100 and arguments["x-overflow"] == "reject-publish"
        assert "x-max-length" not in topology.work_queue_arguments(queue_type, 5)
