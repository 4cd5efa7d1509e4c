"""Interleaved before/after: CPU per task of each process for two (or more) code trees.

    git archive OLD qm | tar -x -C /tmp/before          # a tree to compare with
    .venv/bin/python load/bench_ab.py before=/tmp/before after=. [--batch 150] [--rounds 10]

On a shared machine the load drifts by 2x within minutes, so stacks measured one after
the other differ by more than most changes do. Here every tree gets its own qm-server and
`qm-worker --procs 2` (started with the tree first on PYTHONPATH), all up at once on one
private RabbitMQ, each on a queue of its own; then batches alternate between the stacks
(the order flips every round), so drift falls on all of them alike. Per batch and stack:
CPU ms per task of the server and the supervisor (/proc/PID/task/*/schedstat, all
threads), of the pool children and of RabbitMQ (psutil; RabbitMQ is shared, so its
column also holds whatever the idle stacks cost it meanwhile), and submit latency.
Modes (`--modes`): `seq` (qm.Client.submit one after the other, results on one stream),
`many` (one submit_many), `rt` (submit, then result(), one at a time; a fifth of the
batch), `spin` (8 x test.spin_timed 0.25 via submit_many: supervisor + server CPU in % of
a core over the batch, and a child's idle gap between two tasks, p50 and max, by the
child's own clock). Prints medians over the rounds and each tree paired round by round
with the first; asserts nothing about speed. Run an A/A (the same tree twice) to see what
this machine cannot tell apart: on the 2-core test machine, about 8 % in 10 rounds
(load/README.md). `--fresh-stacks` starts the servers and workers again every round.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "load"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_dispatch import (  # noqa: E402
    MATH_PAYLOAD,
    Stack,
    child_gaps_ms,
    child_stamp,
    percentile,
    thread_cpu_ns,
    tree_cpu_s,
)

import qm  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402

#: Bound on one batch reaching its terminal states.
FINISH_BOUND_S = 120.0
#: CPU-bound tasks per `spin` batch, and their length.
SPIN_TASKS, SPIN_S = 8, 0.25


def own_cpu_s(pid: int) -> float:
    return sum((thread_cpu_ns(pid) or {}).values()) / 1e9


def run_batch(stack: Stack, client: qm.Client, mode: str, batch: int, rabbitmq_pid: int) -> dict[str, float]:
    meters = {
        "server": lambda: own_cpu_s(stack.server.pid),
        "supervisor": lambda: own_cpu_s(stack.worker.pid),
        "children": lambda: tree_cpu_s(stack.worker.pid, with_root=False),
        "rabbitmq": lambda: tree_cpu_s(rabbitmq_pid),
    }
    before = {name: meter() for name, meter in meters.items()}
    started, latencies = time.monotonic(), []
    count = max(10, batch // 5) if mode == "rt" else SPIN_TASKS if mode == "spin" else batch
    if mode == "seq":
        ids = []
        for _ in range(count):
            t0 = time.perf_counter()
            ids.append(client.submit("math", MATH_PAYLOAD, queue=stack.queue))
            latencies.append(time.perf_counter() - t0)
        list(client.results(ids, timeout_s=FINISH_BOUND_S))
    elif mode == "many":
        list(client.results(client.submit_many([("math", MATH_PAYLOAD)] * count, queue=stack.queue),
                            timeout_s=FINISH_BOUND_S))
    elif mode == "rt":
        for _ in range(count):
            t0 = time.perf_counter()
            client.result(client.submit("math", MATH_PAYLOAD, queue=stack.queue), timeout_s=FINISH_BOUND_S)
            latencies.append(time.perf_counter() - t0)
    elif mode == "spin":
        ids = client.submit_many([("test.spin_timed", str(SPIN_S))] * count, queue=stack.queue)
        stamps = [child_stamp(status) for status in client.watch(ids, timeout_s=FINISH_BOUND_S) if status.terminal]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    wall_s = time.monotonic() - started
    used = {name: meter() - before[name] for name, meter in meters.items()}
    if mode == "spin":
        gaps_ms = child_gaps_ms([stamp for stamp in stamps if stamp is not None])
        return {"supervisor_server_pct": 100.0 * (used["server"] + used["supervisor"]) / wall_s,
                "gap_p50_ms": percentile(gaps_ms, 50) or 0.0, "gap_max_ms": max(gaps_ms, default=0.0)}
    row = {name: 1000.0 * seconds / count for name, seconds in used.items()}
    row["all"] = sum(row.values())
    if latencies:
        row["p50_ms"] = 1000.0 * statistics.median(latencies)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="LABEL=PATH: a checkout (or a copy of its qm/) to run")
    parser.add_argument("--batch", type=int, default=150, help="math tasks per batch (150)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds; medians are shown (10)")
    parser.add_argument("--modes", default="seq,many,rt,spin", help="comma-separated: seq, many, rt, spin")
    parser.add_argument("--json", help="also write every batch's numbers here")
    parser.add_argument("--fresh-stacks", action="store_true",
                        help="start every tree's server and worker again each round, so that no stack's "
                             "start (its memory, its cores) lasts the whole run; what an A/A run still shows: "
                             "load/README.md")
    args = parser.parse_args(argv)
    trees = [tuple(tree.split("=", 1)) for tree in args.trees]
    modes = args.modes.split(",")
    results: dict[str, dict[str, list[dict[str, float]]]] = {label: {m: [] for m in modes} for label, _ in trees}
    base = pathlib.Path(tempfile.mkdtemp(prefix="qm-bench-ab-"))
    rabbitmq = LocalRabbitMQ(base / "rabbitmq")
    stacks: dict[str, tuple[Stack, qm.Client]] = {}
    try:
        url = rabbitmq.start()
        assert rabbitmq.process is not None
        for number in range(args.rounds):
            if number == 0 or args.fresh_stacks:
                stop_stacks(stacks)
                start_stacks(stacks, trees, base / f"round-{number}", url)
            order = trees if number % 2 == 0 else trees[::-1]
            for mode in modes:
                for label, _ in order:
                    stack, client = stacks[label]
                    results[label][mode].append(run_batch(stack, client, mode, args.batch, rabbitmq.process.pid))
            print(f"round {number + 1} of {args.rounds}: load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        stop_stacks(stacks)
        rabbitmq.stop()
        shutil.rmtree(base, ignore_errors=True)
    print_medians(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def start_stacks(stacks: dict[str, tuple[Stack, qm.Client]], trees: list[tuple[str, str]], base: pathlib.Path,
                 url: str) -> None:
    """A qm-server and a qm-worker for each tree, on the shared RabbitMQ, each warmed up."""
    for label, path in trees:
        os.environ["PYTHONPATH"] = str(pathlib.Path(path).resolve())  # the stack's processes inherit it
        (base / label).mkdir(parents=True)
        stack = Stack(base / label, url, f"ab-{label}")
        # Started from the stack's own directory: the worker's forkserver runs `python -c`,
        # which puts its working directory first on sys.path, ahead of PYTHONPATH; started
        # from a checkout, every tree's children would run that checkout's qm.
        here = os.getcwd()
        os.chdir(base / label)
        try:
            stack.start()
        finally:
            os.chdir(here)
        client = qm.Client(stack.server.address)
        stacks[label] = (stack, client)
        client.result(client.submit("math", MATH_PAYLOAD, queue=stack.queue), timeout_s=60)  # warm-up


def stop_stacks(stacks: dict[str, tuple[Stack, qm.Client]]) -> None:
    for stack, client in stacks.values():
        client.close()
        stack.stop()
    stacks.clear()


def print_medians(results: dict[str, Any]) -> None:
    print("\nmedians over the rounds (CPU ms per task; p50 in ms; spin in % of a core)")
    for label, by_mode in results.items():
        for mode, rows in by_mode.items():
            if rows:
                cells = " ".join(f"{key}={statistics.median(row[key] for row in rows):.2f}" for key in rows[0])
                print(f"  {label:>10} {mode:>5}: {cells}")
    print_paired(results)


def print_paired(results: dict[str, Any]) -> None:
    """Each later tree against the first, batch by batch (the batches of a round ran minutes
    apart at most, so a pair shares the machine's state): in how many rounds it was lower,
    and the median of the per-round changes. On a machine that drifts, this tells a few
    percent where the medians alone do not."""
    labels = list(results)
    if len(labels) < 2:
        return
    first = labels[0]
    print(f"\npaired with {first}, round by round: rounds lower / median change")
    for label in labels[1:]:
        for mode, rows in results[label].items():
            pairs = list(zip(results[first][mode], rows, strict=True))
            if not pairs:
                continue
            cells = []
            for key in rows[0]:
                changes = [(after[key] - before[key]) / before[key] * 100 for before, after in pairs if before[key]]
                lower = sum(1 for before, after in pairs if after[key] < before[key])
                shown = f"{statistics.median(changes):+.1f} %" if changes else "n/a"
                cells.append(f"{key}={lower}/{len(pairs)} {shown}")
            print(f"  {label:>10} {mode:>5}: {' '.join(cells)}")


if __name__ == "__main__":
    sys.exit(main())
