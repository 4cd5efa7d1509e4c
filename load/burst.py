"""Concurrency burst against qm-server: N concurrent SubmitTask calls over C channels.

    .venv/bin/python load/burst.py                          # 2,000 and 5,000 calls, raw grpc.aio
    .venv/bin/python load/burst.py --calls 2000 --streams   # also N StreamTaskResults streams
    .venv/bin/python load/burst.py --retry                  # retry as qm clients do (same key)

Everything runs on loopback and stops by itself: a private RabbitMQ node in a temporary
directory, one qm-server on port 0 and one qm-worker (`--procs 2`), started with the test
harness in tests/processes.py (as load/bench_worker.py does). All calls are fired at
once from one process over `--channels` grpc.aio channels; the script counts the final
status code of every call, the call latencies (p50/p99/max), the server's RSS (peak of
samples every 50 ms while the burst lasts) and then waits, bounded, until every accepted
task is terminal. It prints the numbers (and writes them as JSON with --json); the exit
code is 1 if any call ended CANCELLED or an accepted task did not finish.

`burst()` is also what tests/load/test_overload.py runs (at 2,000 calls).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import pathlib
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

import grpc
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc  # noqa: E402

#: Deadline of each call: long enough that a queued call is answered, not timed out.
CALL_TIMEOUT_S = 120.0
#: Bound on all accepted tasks becoming terminal after the burst.
DRAIN_TIMEOUT_S = 300.0
#: Codes a qm client retries on submit with the same idempotency key (--retry).
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
#: The details and trailing metadata of the first call ending with each code (for the report).
DETAILS: dict[str, tuple] = {}
TERMINAL = {task_queue_pb2.TASK_STATE_SUCCEEDED, task_queue_pb2.TASK_STATE_FAILED,
            task_queue_pb2.TASK_STATE_TIMED_OUT, task_queue_pb2.TASK_STATE_MEMORY_EXCEEDED,
            task_queue_pb2.TASK_STATE_CRASHED, task_queue_pb2.TASK_STATE_CANCELLED}


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100.0 * len(ordered))) - 1]


class RssSampler:
    """Peak RSS of a process, sampled every `interval_s` while it runs (an asyncio task)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = self.before = self.process.memory_info().rss
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc_info) -> None:
        self._task.cancel()


async def _submit(stub, index: int, queue: str, retry: bool) -> tuple[str, str | None, float, int]:
    """One submit (retried with the same key if asked); (final code, task id, seconds, tries)."""
    request = task_queue_pb2.SubmitTaskRequest(type="math", payload=f"{index} + 1".encode(), queue=queue,
                                               idempotency_key=str(uuid.uuid4()))
    started, tries, delay_s = time.perf_counter(), 0, 0.05
    while True:
        tries += 1
        try:
            response = await stub.SubmitTask(request, timeout=CALL_TIMEOUT_S)
            return "OK", response.task_id, time.perf_counter() - started, tries
        except grpc.aio.AioRpcError as exc:
            if not retry or exc.code() not in RETRIED or time.perf_counter() - started > CALL_TIMEOUT_S:
                DETAILS.setdefault(exc.code().name, (exc.details(), exc.trailing_metadata()))
                return exc.code().name, None, time.perf_counter() - started, tries
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 1.0)


async def _follow(stub, task_id: str) -> tuple[str, int | None]:
    """Follow one task on its own StreamTaskResults stream; (final code, last state)."""
    state = None
    try:
        call = stub.StreamTaskResults(iter([task_queue_pb2.StreamTaskResultsRequest(task_ids=[task_id])]),
                                      timeout=DRAIN_TIMEOUT_S)
        async for response in call:
            state = response.status.state
        return "OK", state
    except grpc.aio.AioRpcError as exc:
        DETAILS.setdefault(f"stream {exc.code().name}", (exc.details(), exc.trailing_metadata()))
        return exc.code().name, state


async def burst(address: str, calls: int, queue: str = "", *, channels: int = 8, streams: bool = False,
                retry: bool = False, server_pid: int | None = None) -> dict[str, Any]:
    """Fire `calls` concurrent SubmitTask calls (then, with streams, one StreamTaskResults
    stream per accepted task, all at once) and wait until every accepted task is terminal."""
    chans = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    stubs = [task_queue_pb2_grpc.TaskQueueStub(channel) for channel in chans]
    try:
        for channel in chans:
            await asyncio.wait_for(channel.channel_ready(), 30)
        sampler = RssSampler(server_pid) if server_pid else None
        started = time.perf_counter()
        if sampler:
            sampler.__enter__()
        try:
            results = await asyncio.gather(*(_submit(stubs[i % channels], i, queue, retry) for i in range(calls)))
            submit_wall_s = time.perf_counter() - started
            accepted = [task_id for code, task_id, _s, _t in results if code == "OK"]
            stream_codes: Counter = Counter()
            finals: dict[str, int | None] = {}
            if streams:
                followed = await asyncio.gather(*(_follow(stubs[i % channels], task_id)
                                                  for i, task_id in enumerate(accepted)))
                stream_codes = Counter(code for code, _state in followed)
                finals = {task_id: state for task_id, (_code, state) in zip(accepted, followed, strict=True)}
        finally:
            if sampler:
                sampler.__exit__()
        # Every accepted task must end: ask for the ones not seen terminal on a stream.
        pending = [t for t in accepted if finals.get(t) not in TERMINAL]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            call = stubs[0].StreamTaskResults(iter([task_queue_pb2.StreamTaskResultsRequest(task_ids=pending)]),
                                              timeout=max(1.0, deadline - time.monotonic()))
            try:
                async for response in call:
                    finals[response.status.task_id] = response.status.state
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            pending = [t for t in pending if finals.get(t) not in TERMINAL]
        latencies = [seconds for code, _t, seconds, _tries in results if code == "OK"]
        return {
            "calls": calls, "channels": channels, "retry": retry,
            "submit_codes": dict(Counter(code for code, _t, _s, _tries in results)),
            "first_error_of_code": {code: repr(details) for code, details in DETAILS.items()},
            "stream_codes": dict(stream_codes),
            "retried_calls": sum(1 for *_rest, tries in results if tries > 1),
            "accepted": len(accepted), "distinct_task_ids": len(set(accepted)),
            "terminal": sum(1 for t in accepted if finals.get(t) in TERMINAL),
            "succeeded": sum(1 for t in accepted if finals.get(t) == task_queue_pb2.TASK_STATE_SUCCEEDED),
            "submit_wall_s": submit_wall_s,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            "latency_max_s": max(latencies, default=None),
            "server_rss_before_mib": sampler.before / 2**20 if sampler else None,
            "server_rss_peak_mib": sampler.peak / 2**20 if sampler else None,
        }
    finally:
        for channel in chans:
            await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Concurrent SubmitTask burst against a private stack.")
    parser.add_argument("--calls", default="2000,5000", help="comma-separated burst sizes (default 2000,5000)")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--streams", action="store_true", help="also one StreamTaskResults stream per task")
    parser.add_argument("--retry", action="store_true", help="retry refused submits with the same key")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of qm-server, e.g. QM_SERVER__MAX_CONCURRENT_RPCS=500")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    from qm.testing.rabbitmq import LocalRabbitMQ
    from tests.processes import start_server, start_worker, unique

    env = dict(item.split("=", 1) for item in args.server_env)
    report: list[dict[str, Any]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="qm-burst-") as tmp:
        base = pathlib.Path(tmp)
        rabbitmq = LocalRabbitMQ(base / "rabbitmq")
        url = rabbitmq.start()
        server = worker = None
        try:
            server = start_server(url, base, env=env)
            queue = unique("burst")
            worker = start_worker(url, procs=2, queues=queue)
            for calls in [int(n) for n in args.calls.split(",")]:
                result = asyncio.run(burst(server.address, calls, queue, channels=args.channels,
                                           streams=args.streams, retry=args.retry, server_pid=server.pid))
                report.append(result)
                print(json.dumps(result, indent=2, default=str), flush=True)
                failed |= ("CANCELLED" in result["submit_codes"] or "CANCELLED" in result["stream_codes"]
                           or result["terminal"] != result["accepted"])
        finally:
            for process in (worker, server):
                if process is not None:
                    process.stop()
            if failed and server is not None:
                print(server.logs[-5000:], file=sys.stderr)
            rabbitmq.stop()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
