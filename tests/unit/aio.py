"""Helpers for running coroutines in unit tests without pytest-asyncio."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

#: Upper bound of any single wait in a unit test; generous, never expected to be reached.
TIMEOUT_S = 20.0


def run(coroutine_function: Callable[..., Awaitable[Any]], *args: Any, timeout_s: float = 60.0) -> Any:
    """Run `coroutine_function(*args)` on a fresh loop, failing (not hanging) past timeout_s."""
    async def bounded():
        return await asyncio.wait_for(coroutine_function(*args), timeout_s)
    return asyncio.run(bounded())


async def within(awaitable: Awaitable[Any], timeout_s: float = TIMEOUT_S) -> Any:
    """Await with a bound: a hang becomes a TimeoutError naming nothing but failing fast."""
    return await asyncio.wait_for(awaitable, timeout_s)
