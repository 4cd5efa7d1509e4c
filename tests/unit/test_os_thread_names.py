"""Threads carry their names to the kernel (top -H, ps -L, py-spy), so an operator can
see which of a server's threads uses the CPU. Linux: read back from /proc."""
from __future__ import annotations

import os
import threading

import pytest

from qm.os_thread_names import name_this_thread
from qm.server.store import Store
from tests.processes import wait_until
from tests.unit.aio import run

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")


def kernel_names() -> set[str]:
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.add(comm.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return names


def name_seen_by_kernel(target_name: str | None, thread_name: str) -> str:
    seen: list[str] = []

    def body() -> None:
        name_this_thread(target_name)
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
            seen.append(comm.read().strip())

    thread = threading.Thread(target=body, name=thread_name)
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_shows_its_python_name_cut_to_the_kernels_15_bytes():
    assert name_seen_by_kernel(None, "store-writer") == "store-writer"
    assert name_seen_by_kernel("a-name-longer-than-fifteen", "x") == "a-name-longer-t"


def test_the_stores_writer_and_checkpoint_threads_are_named(tmp_path):
    async def body():
        store = Store(tmp_path / "s.db")
        store.start_checkpoints(interval_s=3600)
        try:
            # each thread names itself first thing, maybe after its start() returned
            wait_until(lambda: {"store-writer", "wal-checkpoint"} <= kernel_names(), 30, interval_s=0.01,
                       message="the store threads' names in /proc")
            return kernel_names()
        finally:
            await store.close()

    names = run(body)
    assert {"store-writer", "wal-checkpoint"} <= names, names
