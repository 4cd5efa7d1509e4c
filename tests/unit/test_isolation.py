"""Suspect (redelivered) tasks run alone: the worker-side half of poison containment."""
from __future__ import annotations

import asyncio

from qm.worker.isolation import Isolation
from tests.unit.aio import run

#: Bound on waiting for a state of the gate (it changes within a loop iteration or two).
WAIT_S = 5.0


async def until(condition) -> None:
    """Let other tasks run until `condition()` holds (bounded); no wall-clock guess."""
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0)


async def settle() -> None:
    """One loop iteration: a task created just now runs until it first blocks."""
    await asyncio.sleep(0)


def test_a_suspect_waits_for_running_tasks_and_runs_alone():
    async def scenario():
        gate, order = Isolation(), []
        await gate.enter(False)                      # an ordinary task is running

        async def task(name, suspect, hold_s=0.0):
            await gate.enter(suspect)
            order.append(f"start {name}")
            await asyncio.sleep(hold_s)
            order.append(f"end {name}")
            gate.leave(suspect)

        suspect = asyncio.create_task(task("suspect", True, 0.05))
        await until(lambda: gate.suspects_waiting == 1)
        later = asyncio.create_task(task("later", False))  # arrives while the suspect waits
        await settle()
        assert order == []                            # the suspect waits; the later one waits behind it
        gate.leave(False)                             # the running task ends
        await asyncio.gather(suspect, later)
        return order

    assert run(scenario) == ["start suspect", "end suspect", "start later", "end later"]


def test_ordinary_tasks_run_side_by_side_when_no_suspect_is_around():
    async def scenario():
        gate = Isolation()
        await gate.enter(False)
        await asyncio.wait_for(gate.enter(False), 1.0)  # does not wait
        return gate.running

    assert run(scenario) == 2


def test_a_cancelled_suspect_does_not_hold_back_ordinary_tasks():
    async def scenario():
        gate = Isolation()
        await gate.enter(False)
        waiting_suspect = asyncio.create_task(gate.enter(True))
        await until(lambda: gate.suspects_waiting == 1)
        ordinary = asyncio.create_task(gate.enter(False))
        await settle()
        assert not ordinary.done()
        waiting_suspect.cancel()
        await asyncio.wait_for(ordinary, 1.0)
        return gate.running

    assert run(scenario) == 2
