"""Helpers for running coroutines in unit tests without pytest-asyncio."""
from __future__ import annotations

import asyncio
import inspect
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


class Blocking:
    """Calls an object's coroutine methods as plain calls, each run to completion on a
    loop of its own: tests of an async component written as a sequence of steps."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run one awaitable on this loop, bounded by TIMEOUT_S."""
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, TIMEOUT_S))

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.target, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        return lambda *args, **kwargs: self.run(attribute(*args, **kwargs))

    def close(self) -> None:
        """Close the target (awaited), then the loop."""
        try:
            self.run(self.target.close())
        finally:
            self.loop.close()
