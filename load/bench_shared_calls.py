"""Submits that meet share a call: batch_submits on and off, interleaved.

    .venv/bin/python load/bench_shared_calls.py [--rounds 4] [--tasks 5000] [--threads 2,8,32]

One private RabbitMQ, one qm-server and one `qm-worker --procs 2` (bench_dispatch's
stack, default config). Each round, in alternating order, for each way with sharing on
(`qm/client/submit_batching.py`) and off (`batch_submits=False`): `--tasks` math tasks
submitted and followed to their results on one stream, and the CPU ms per task of every
process (client included). Ways: `gather` (qm.aio.Client.submit under asyncio.gather),
`aio submit_many` (the reference), and `T threads` (T threads sharing one qm.Client,
each submitting its share one at a time; p50 submit latency too). Prints medians; asserts
nothing about speed, and exits 1 if any task did not end SUCCEEDED with the right result.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "load"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_dispatch import MATH_PAYLOAD, CpuMeter, Stack, check_math, cpu_fields, percentile  # noqa: E402

import qm  # noqa: E402
import qm.aio  # noqa: E402

#: Bound on a run's tasks reaching their final states.
FINISH_BOUND_S = 300.0


def run_gather(stack: Stack, shared: bool, count: int, many: bool = False) -> dict[str, Any]:
    async def go() -> list:
        async with qm.aio.Client(stack.server.address, batch_submits=shared) as client:
            if many:
                ids = await client.submit_many([("math", MATH_PAYLOAD)] * count, queue=stack.queue)
            else:
                submits = (client.submit("math", MATH_PAYLOAD, queue=stack.queue) for _ in range(count))
                ids = await asyncio.gather(*submits)
            return [s async for s in client.results(ids, timeout_s=FINISH_BOUND_S)]

    meter = CpuMeter(stack).start()
    statuses = asyncio.run(go())
    cpu_s, wall_s = meter.stop()
    return {"tasks_per_s": count / wall_s, **cpu_fields(cpu_s, count), "check": check_math(statuses, count)}


def run_threads(stack: Stack, shared: bool, count: int, threads: int) -> dict[str, Any]:
    ids: list[str] = []
    latencies_ms: list[float] = []
    lock = threading.Lock()
    with qm.Client(stack.server.address, batch_submits=shared) as client:

        def submit_share() -> None:
            mine, took_ms = [], []
            for _ in range(count // threads):
                started = time.perf_counter()
                mine.append(client.submit("math", MATH_PAYLOAD, queue=stack.queue))
                took_ms.append(1000 * (time.perf_counter() - started))
            with lock:
                ids.extend(mine)
                latencies_ms.extend(took_ms)

        meter = CpuMeter(stack).start()
        workers = [threading.Thread(target=submit_share) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        statuses = list(client.results(ids, timeout_s=FINISH_BOUND_S))
        cpu_s, wall_s = meter.stop()
    return {"tasks_per_s": len(ids) / wall_s, **cpu_fields(cpu_s, len(ids)),
            "submit_p50_ms": percentile(latencies_ms, 50), "check": check_math(statuses, len(ids))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds; medians are shown (4)")
    parser.add_argument("--tasks", type=int, default=5000, help="math tasks per run (5000)")
    parser.add_argument("--threads", default="2,8,32", help="comma-separated thread counts (2,8,32)")
    parser.add_argument("--quick", action="store_true", help="correctness smoke: 1 round, 60 tasks, 4 threads")
    parser.add_argument("--broker-url", help="use this RabbitMQ instead of starting a private node")
    parser.add_argument("--queue", default="default", help="logical queue for the tasks (default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.tasks, args.threads = 1, 60, "4"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ways: list[tuple[str, Any]] = [
        ("gather", lambda stack, shared: run_gather(stack, shared, args.tasks)),
        ("aio submit_many", lambda stack, shared: run_gather(stack, shared, args.tasks, many=True)),
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        ways.append((f"{threads} threads", lambda stack, shared, t=threads: run_threads(stack, shared, args.tasks, t)))
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qm-bench-shared-") as tmp:
        stack = Stack(pathlib.Path(tmp), args.broker_url, args.queue)
        try:
            stack.start()
            for number in range(args.rounds):
                for name, run in ways:
                    for shared in (True, False) if number % 2 == 0 else (False, True):
                        result = run(stack, shared)
                        runs.setdefault((name, shared), []).append(result)
                        check = result["check"]
                        if check["succeeded_right"] != check["expected"]:
                            failed.append(f"{name}, sharing {'on' if shared else 'off'}: {check}")
                        print(f"round {number + 1}: {name}, sharing {'on' if shared else 'off'}: "
                              f"{result['tasks_per_s']:,.0f} tasks/s", flush=True)
        finally:
            stack.stop()
    print("\n| way | sharing | tasks/s end to end | CPU ms/task, all processes | submit p50, ms |")
    print("|---|---|---|---|---|")
    for (name, shared), results in runs.items():
        p50s = [r["submit_p50_ms"] for r in results if r.get("submit_p50_ms") is not None]
        p50 = f"{statistics.median(p50s):.2f}" if p50s else ""
        print(f"| {name} | {'on' if shared else 'off'} | {statistics.median(r['tasks_per_s'] for r in results):,.0f} "
              f"| {statistics.median(r['cpu_ms_per_task_all'] for r in results):.2f} | {p50} |")
    for failure in failed:
        print(f"FAILED: {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
