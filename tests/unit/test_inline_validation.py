"""Small payloads of a type that vouches for its check run on the event loop (issue 9):
no thread hand-over per submit; anything larger still goes to a validator thread."""

import asyncio
import threading

import pytest

from qm.errors import ValidationError
from qm.registry import TaskType
from qm.server.validators import PayloadValidators
from qm.tasks.math import TASK_TYPE as MATH


def _recording_type(seen: list[int]) -> TaskType:
    return TaskType(
        "recorded",
        lambda payload: payload,
        validate=lambda payload: seen.append(threading.get_ident()),
        inline_check_max_bytes=8,
    )


def test_payloads_up_to_the_bound_are_checked_on_the_loop_and_larger_ones_on_a_thread():
    seen: list[int] = []

    async def body() -> None:
        validators = PayloadValidators()
        try:
            await validators.check(_recording_type(seen), b"12345678")
            await validators.check(_recording_type(seen), b"123456789")
        finally:
            validators.close()

    asyncio.run(body())
    loop_thread = threading.get_ident()
    assert seen[0] == loop_thread, "an 8-byte payload went to a validator thread"
    assert seen[1] != loop_thread, "a payload over inline_check_max_bytes was checked on the event loop"


def test_a_small_math_payload_refused_inline_names_the_field_and_the_reason():
    async def body() -> None:
        validators = PayloadValidators()
        try:
            await validators.check(MATH, b"1 + 2 * 5")  # accepted
            with pytest.raises(ValidationError) as refused:
                await validators.check(MATH, b"__import__")
            assert refused.value.field == "payload" and "not allowed" in refused.value.message
        finally:
            validators.close()

    asyncio.run(body())


def test_a_negative_inline_bound_fails_the_type_with_the_field_named():
    from qm import registry

    bad = TaskType("acme.bad", lambda payload: payload, inline_check_max_bytes=-1)
    loaded = registry.validate([bad])
    assert "acme.bad" not in loaded.types
    assert any("inline_check_max_bytes=-1" in str(error) for error in loaded.errors)
