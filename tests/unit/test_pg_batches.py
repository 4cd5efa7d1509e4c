"""BatchedWrites (qm/server/pg_batches.py): writes of the same moment share one batch; a
caller hears of its own row only. The PostgreSQL store's use of it is in
tests/contract/test_store_contract.py (TestSharedPostgresStore)."""
from __future__ import annotations

import asyncio
from typing import Sequence

import pytest

from qm.server.pg_batches import BatchedWrites
from tests.unit.aio import run, within


class Taken(Exception):
    """A row the store refuses (as a unique key taken)."""


class Table:
    """Rows written, and the calls that wrote them; `refused` rows raise Taken alone and
    spoil any batch they are in; `down` makes every write fail; each write waits for
    `gate`, if given."""

    def __init__(self, refused: Sequence[tuple] = (), gate: asyncio.Event | None = None) -> None:
        self.rows: list[tuple] = []
        self.calls: list[tuple[str, int]] = []
        self.refused = set(refused)
        self.gate = gate
        self.down: Exception | None = None

    async def many(self, rows: Sequence[tuple]) -> None:
        self.calls.append(("many", len(rows)))
        if self.gate is not None:
            await self.gate.wait()
        if self.down is not None:
            raise self.down
        if self.refused.intersection(rows):
            raise Taken("a row of the batch")
        self.rows += rows

    async def one(self, row: tuple) -> None:
        self.calls.append(("one", 1))
        if self.gate is not None:
            await self.gate.wait()
        if self.down is not None:
            raise self.down
        if row in self.refused:
            raise Taken(f"row {row}")
        self.rows.append(row)


def batched(table: Table, writers: int = 2) -> BatchedWrites:
    return BatchedWrites(table.many, table.one, alone_on=Taken, writers=writers)


def test_writes_of_one_moment_are_one_batch_and_a_lone_write_goes_alone():
    async def scenario() -> Table:
        table = Table()
        writes = batched(table)
        await within(asyncio.gather(*(writes.write((i,)) for i in range(50))))
        await within(writes.write(("lone",)))
        return table

    table = run(scenario)
    assert table.calls == [("many", 50), ("one", 1)]
    assert table.rows == [(i,) for i in range(50)] + [("lone",)]


def test_a_refused_row_fails_only_its_own_caller():
    async def scenario() -> tuple[list[object], Table]:
        table = Table(refused=[(3,)])
        writes = batched(table)
        outcomes = await within(asyncio.gather(*(writes.write((i,)) for i in range(6)), return_exceptions=True))
        return outcomes, table

    outcomes, table = run(scenario)
    assert isinstance(outcomes[3], Taken) and "row (3,)" in str(outcomes[3])
    assert [outcome for i, outcome in enumerate(outcomes) if i != 3] == [None] * 5
    assert sorted(table.rows) == [(i,) for i in range(6) if i != 3]
    assert table.calls == [("many", 6)] + [("one", 1)] * 6


def test_a_failed_batch_fails_every_caller_with_its_cause():
    async def scenario() -> list[object]:
        table = Table()
        table.down = ConnectionError("store unreachable")
        writes = batched(table)
        return await within(asyncio.gather(*(writes.write((i,)) for i in range(4)), return_exceptions=True))

    outcomes = run(scenario)
    assert [str(outcome) for outcome in outcomes] == ["store unreachable"] * 4


def test_writes_during_a_batch_in_flight_join_the_next_one():
    async def scenario() -> Table:
        gate = asyncio.Event()
        table = Table(gate=gate)
        writes = batched(table, writers=1)
        first = asyncio.gather(*(writes.write((i,)) for i in range(3)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first batch is in flight, waiting on the gate
        later = asyncio.gather(*(writes.write((i,)) for i in range(3, 8)))
        await asyncio.sleep(0)
        assert table.calls == [("many", 3)]
        gate.set()
        await within(asyncio.gather(first, later))
        return table

    table = run(scenario)
    assert table.calls == [("many", 3), ("many", 5)]
    assert table.rows == [(i,) for i in range(8)]


def test_a_cancelled_caller_does_not_stop_the_others_rows():
    async def scenario() -> tuple[Table, bool]:
        gate = asyncio.Event()
        table = Table(gate=gate)
        writes = batched(table)
        callers = [asyncio.create_task(writes.write((i,))) for i in range(4)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        callers[1].cancel()
        gate.set()
        await within(asyncio.gather(*callers, return_exceptions=True))
        await within(writes.close())
        return table, callers[1].cancelled()

    table, cancelled = run(scenario)
    assert cancelled
    assert table.rows == [(i,) for i in range(4)]  # in the batch already: written all the same


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_no_more_batches_in_flight_than_writers(writers):
    async def scenario() -> int:
        gate = asyncio.Event()
        table = Table(gate=gate)
        writes = batched(table, writers=writers)
        callers = []
        for i in range(10):  # one write a loop turn: each could start a batch of its own
            callers.append(asyncio.ensure_future(writes.write((i,))))
            await asyncio.sleep(0)
        in_flight = len(table.calls)  # each waits on the gate
        gate.set()
        await within(asyncio.gather(*callers))
        return in_flight

    assert run(scenario) == writers
