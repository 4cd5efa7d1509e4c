"""What qm.progress() costs the task that calls it (issue 14, item 1).

    .venv/bin/python load/bench_progress.py [--calls 200000]

Three runs of CALLS calls in a tight loop, in this process: with no reporter (the no-op
outside a worker), with a child's ChildReporter writing on a real multiprocessing pipe
whose other end a thread drains (what a pool child does), and the same with a small
JSON detail. Reports microseconds per call and how many updates crossed the pipe (the
child sends at most one per 50 ms; the supervisor then lets at most 10 a second per task
go to the server). Asserts nothing: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import multiprocessing
import threading
import time

import qm
from qm import task_progress
from qm.worker.progress import ChildReporter


def drain(conn, counted: list[int]) -> None:
    try:
        while True:
            conn.recv()
            counted[0] += 1
    except (EOFError, OSError):
        return


def timed(calls: int, detail: bool) -> float:
    started = time.perf_counter()
    for index in range(calls):
        qm.progress(index / calls, "working", {"row": index} if detail else None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    calls = parser.parse_args().calls
    rows = [("no reporter (outside a worker)", timed(calls, False), 0)]
    for detail in (False, True):
        parent, child = multiprocessing.Pipe()
        counted = [0]
        reader = threading.Thread(target=drain, args=(parent, counted), daemon=True)
        reader.start()
        reporter = ChildReporter(child, threading.Lock())
        reporter.begin("bench")
        task_progress.install(reporter)
        try:
            elapsed = timed(calls, detail)
        finally:
            task_progress.install(None)
            reporter.end()
        time.sleep(0.1)  # the sender's last interval: let the count settle (a benchmark, not a test)
        child.close()
        rows.append((f"pool child's reporter{' + detail' if detail else ''}", elapsed, counted[0]))
    print(f"{calls:,} calls of qm.progress()")
    print(f"{'path':<38} {'µs/call':>8} {'calls/s':>12} {'sent on pipe':>13} {'run s':>7}")
    for name, elapsed, sent in rows:
        print(f"{name:<38} {elapsed / calls * 1e6:8.2f} {calls / elapsed:12,.0f} {sent:13,} {elapsed:7.2f}")


if __name__ == "__main__":
    main()
