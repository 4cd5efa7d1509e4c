"""Bursts of concurrent calls against a real stack (issue 16, item 2): one client, 8
grpc.aio channels, 2,000 SubmitTask calls at once (load/burst.py's `burst`). No call may
end CANCELLED, and every accepted task must reach a terminal state; a refusal is
RESOURCE_EXHAUSTED with the retry hint. Counts only: nothing here depends on speed.
5,000 calls run in load/burst.py (numbers in load/README.md), not in CI.
"""
from __future__ import annotations

import asyncio
import importlib.util
import pathlib

BURST = pathlib.Path(__file__).resolve().parents[2] / "load" / "burst.py"
CALLS = 2000


def _burst_module():
    spec = importlib.util.spec_from_file_location("qm_load_burst", BURST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result: dict, server) -> None:
    context = f"{result}\n{server.logs[-3000:]}"
    assert "CANCELLED" not in result["submit_codes"], context
    assert "CANCELLED" not in result["stream_codes"], context
    assert result["accepted"] == result["distinct_task_ids"], context
    assert result["terminal"] == result["accepted"], context
    assert result["succeeded"] == result["accepted"], context


def test_a_burst_of_2000_submits_and_streams_ends_with_no_call_cancelled(rabbitmq, launcher):
    """Default limit: every call is taken and answered (queued, never dropped)."""
    burst = _burst_module()
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    result = asyncio.run(burst.burst(server.address, CALLS, queue, streams=True, server_pid=server.pid))
    _check(result, server)
    assert result["submit_codes"] == {"OK": CALLS}, result
    assert result["stream_codes"] == {"OK": CALLS}, result


def test_beyond_the_limit_submits_are_refused_with_a_hint_and_retried_to_one_task_each(rabbitmq, launcher):
    """A low server.max_concurrent_rpcs: refusals are RESOURCE_EXHAUSTED with
    retry-pushback-ms, and a client retrying with the same key gets every task in, once."""
    burst = _burst_module()
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env={"QM_SERVER__MAX_CONCURRENT_RPCS": "50"})
    launcher.worker(rabbitmq.url, procs=2, queues=queue)
    raw = asyncio.run(burst.burst(server.address, CALLS, queue, server_pid=server.pid))
    _check(raw, server)
    assert set(raw["submit_codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, raw
    if "RESOURCE_EXHAUSTED" in raw["submit_codes"]:
        assert "retry-pushback-ms" in raw["first_error_of_code"]["RESOURCE_EXHAUSTED"], raw
    retried = asyncio.run(burst.burst(server.address, CALLS, queue, retry=True, server_pid=server.pid))
    _check(retried, server)
    assert retried["submit_codes"] == {"OK": CALLS}, retried
