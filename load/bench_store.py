"""Store-size benchmark: does a task cost the server the same with 0, 100,000 and
1,000,000 finished tasks in its store?

    .venv/bin/python load/bench_store.py                                   # 0, 100k, 1M (~5 minutes)
    .venv/bin/python load/bench_store.py --sizes 0,100000 --tasks 1000 --repeat 1 --json out.json

For each size, a SQLite store file filled directly (executemany in one transaction,
bounded time) with N finished `math` tasks, each with an idempotency key as qm.Client
always sends one. Then, `--repeat` times, size after size (interleaved, so the noise of a
shared machine falls on every size alike), each measurement on a fresh copy of that file:

1. In process, on that store file (the store calls a submit and the events applier make):
   `find_by_idempotency_key` of a new key, `insert_unconfirmed` + `confirm`, and
   event-apply throughput (RUNNING then SUCCEEDED for each task, in batches of
   APPLY_BATCH, as the server's applier does), and a batched lifecycle (BATCH_TASKS
   inserts at once as a SubmitTasks call makes them, their confirms, their outcomes in
   one apply: CPU us per task). Each phase is bounded in time. New tasks get time-ordered
   ids and keys as the server and qm.Client make them (`--ids random`: uuid4, as before).
2. End to end: a real qm-server started on that data dir, a real `qm-worker --procs 2`, a
   private RabbitMQ node on loopback (qm.testing.rabbitmq), started with the test
   harness in tests/processes.py as load/bench_worker.py does. `--tasks` math tasks are
   submitted from `--threads` threads through one qm.Client: submit latency p50/p99 (the
   RPC returns after RabbitMQ confirmed the task), server CPU per task (psutil user+system
   of the qm-server process from the first submit until every task is terminal) and the
   end-to-end rate.

Prints one table of medians, each size against the empty store. Nothing is asserted: the
numbers depend on the machine and on what else runs on it (see load/README.md).
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import pathlib
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "load"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_worker import cpu_seconds, percentile, rounded, states_of, wait_all  # noqa: E402

import qm  # noqa: E402
from qm.ids import time_ordered_id  # noqa: E402
from qm.messages import TaskEvent  # noqa: E402
from qm.server.store import Store, TaskRecord  # noqa: E402
from qm.states import TaskState  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import Server, Worker, band_queues, delete_queues, start_server, start_worker, unique  # noqa: E402

DEFAULT_SIZES = (0, 100_000, 1_000_000)
#: --ids: how the in-process phase makes the ids and keys of the tasks it adds.
NEW_IDS: dict[str, Callable[[], str]] = {"time": time_ordered_id, "random": lambda: str(uuid.uuid4())}
#: Tasks per batch in the in-process batched phase (a SubmitTasks call's inserts share a transaction).
BATCH_TASKS = 500
#: Rows written per executemany call while filling a store.
FILL_CHUNK = 50_000
#: Events per Store.apply call in the in-process measurement.
APPLY_BATCH = 100
#: Bound on each in-process phase (a slow store stops early; the mean is still reported).
PHASE_BOUND_S = 15.0
#: Bound on submitting one round of tasks, and on waiting for it to finish.
SUBMIT_BOUND_S = 180.0
FINISH_BOUND_S = 180.0
MIB = 1024 * 1024


# -- filling a store ----------------------------------------------------------------------

_FILL_COLUMNS = ("task_id", "type", "queue", "codec", "state", "attempts", "result", "error", "worker",
                 "created_at", "started_at", "finished_at", "updated_at", "timeout_s", "memory_limit_mb",
                 "idempotency_key", "max_retries", "starts")


def _finished_rows(count: int, now: float):
    """`count` SUCCEEDED math tasks that finished over the last hour (well inside the
    retention), oldest first, each with its own idempotency key."""
    for i in range(count):
        finished = now - 3600.0 + 3600.0 * i / max(count, 1)
        yield (str(uuid.uuid4()), "math", "default", "text", int(TaskState.SUCCEEDED), 1, b"2", "", "w-fill",
               finished - 0.02, finished - 0.01, finished, finished, 600.0, 0, str(uuid.uuid4()), 0, 1)


def close_store(store: Store) -> None:
    """Close a store, awaiting close() where it is a coroutine (since the async seam)."""
    result: Any = store.close()
    if inspect.isawaitable(result):
        asyncio.run(result)


def fill_store(db_path: pathlib.Path, count: int) -> float:
    """Create the store (its schema from qm.server.store) and add `count` finished tasks in
    one transaction; return the seconds it took."""
    t0 = time.monotonic()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    close_store(Store(db_path))  # schema, indexes (and whatever else this version keeps) as the server makes them
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        # Straight into the file, no journal, no fsync: a failed fill is thrown away anyway.
        # The store sets WAL again when it opens.
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")  # 256 MiB: random-key index inserts stay in memory
        db.execute("BEGIN")
        rows = _finished_rows(count, time.time())
        insert = (f"INSERT INTO tasks ({', '.join(_FILL_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in _FILL_COLUMNS)})")
        while True:
            chunk = [row for _, row in zip(range(FILL_CHUNK), rows, strict=False)]  # rows: longer
            if not chunk:
                break
            db.executemany(insert, chunk)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    with open(db_path, "rb+") as filled:  # on disk before anything is measured
        os.fsync(filled.fileno())
    return time.monotonic() - t0


# -- 1. in process ------------------------------------------------------------------------


def _timed_loop(items: list, step, bound_s: float) -> tuple[int, float, float]:
    """Run step(item) for each item until done or bound_s passed; (how many, wall seconds,
    CPU seconds of this process: on a shared machine the CPU time is the steadier measure)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    done = 0
    for item in items:
        step(item)
        done += 1
        if time.perf_counter() - wall0 > bound_s:
            break
    return done, time.perf_counter() - wall0, time.process_time() - cpu0


def _batched_lifecycle(store: Store, call: Callable[[Any], Any], new_id: Callable[[], str], ops: int,
                       now: float) -> tuple[int, float, float]:
    """`ops` tasks in batches of BATCH_TASKS, as a submit_many and its outcomes reach the
    store: the batch's inserts at once (they share one transaction), their confirms, their
    SUCCEEDED events in one apply. (batches done, wall s, CPU s), bounded in time."""
    async def lifecycle(chunk: list[TaskRecord]) -> None:
        await asyncio.gather(*(store.insert_unconfirmed(r, "default", b"message body of about this size" * 4)
                               for r in chunk))
        for record in chunk:
            await store.confirm(record.task_id)
        await store.apply([TaskEvent(r.task_id, "math", "default", 1, TaskState.SUCCEEDED, "w1", b"2", at_s=now + 2)
                           for r in chunk], {"math": "text"})

    records = [TaskRecord.queued(new_id(), "math", "default", "text", now, 600.0, 0, new_id(), 0) for _ in range(ops)]
    chunks = [records[i:i + BATCH_TASKS] for i in range(0, len(records), BATCH_TASKS)]
    return _timed_loop(chunks, lambda chunk: call(lifecycle(chunk)), PHASE_BOUND_S)


def measure_store_calls(db_path: pathlib.Path, ops: int, new_id: Callable[[], str] = time_ordered_id) -> dict[str, Any]:
    """Per-call cost of what a submit and the events applier do to the store, opened as the
    server opens it (with its checkpoint thread, where the store has one). New tasks get
    ids and keys from `new_id`: the server's (time-ordered) by default."""
    store = Store(db_path)
    loop = asyncio.new_event_loop()

    def call(result: Any) -> Any:  # store methods are coroutines since the async seam
        return loop.run_until_complete(result) if inspect.isawaitable(result) else result

    if hasattr(store, "start_checkpoints"):
        store.start_checkpoints()
    try:
        now = time.time()
        records = [TaskRecord(new_id(), "math", "default", "text", TaskState.QUEUED, 0, None, "", "",
                              now, None, None, now, 600.0, 0, new_id(), 0) for _ in range(ops)]
        keys = _timed_loop(records, lambda r: call(store.find_by_idempotency_key(r.idempotency_key)), PHASE_BOUND_S)

        def accept(record: TaskRecord) -> None:
            call(store.insert_unconfirmed(record, "default", b"message body of about this size" * 4))
            call(store.confirm(record.task_id))

        inserts = _timed_loop(records, accept, PHASE_BOUND_S)
        inserted = inserts[0]
        started = [TaskEvent(r.task_id, "math", "default", 1, TaskState.RUNNING, "w1", at_s=now + 1)
                   for r in records[:inserted]]
        finished = [TaskEvent(r.task_id, "math", "default", 1, TaskState.SUCCEEDED, "w1", b"2", at_s=now + 2)
                    for r in records[:inserted]]
        events = started + finished
        batches = [events[i:i + APPLY_BATCH] for i in range(0, len(events), APPLY_BATCH)]
        applies = _timed_loop(batches, lambda batch: call(store.apply(batch, {"math": "text"})), PHASE_BOUND_S)
        applied = sum(len(batch) for batch in batches[:applies[0]])
        batched = _batched_lifecycle(store, call, new_id, ops, now)
        counts = _timed_loop(range(100), lambda _: (call(store.count()), call(store.count_dead_letters())),
                             PHASE_BOUND_S)
    finally:
        call(store.close())
        loop.close()

    def per_call_us(measured: tuple[int, float, float]) -> dict[str, float]:
        done, wall_s, cpu_s = measured
        return {"calls": done, "wall_us": 1e6 * wall_s / max(done, 1), "cpu_us": 1e6 * cpu_s / max(done, 1)}

    return {
        "find_key": per_call_us(keys), "insert_confirm": per_call_us(inserts), "counts": per_call_us(counts),
        "batched": {"tasks": batched[0] * BATCH_TASKS,
                    "cpu_us_per_task": 1e6 * batched[2] / max(batched[0] * BATCH_TASKS, 1)},
        "apply": {"events": applied, "events_per_s": applied / applies[1] if applies[1] else None,
                  "events_per_cpu_s": applied / applies[2] if applies[2] else None},
    }


# -- 2. end to end ------------------------------------------------------------------------


class Stack:
    """A private RabbitMQ node for the whole run (or a running one, given its URL); a
    server (on a given data dir) and a worker per measurement."""

    def __init__(self, base: pathlib.Path, broker_url: str = "") -> None:
        self.base = base
        self.rabbitmq = None if broker_url else LocalRabbitMQ(base / "rabbitmq")
        self.url = broker_url
        self.server: Server | None = None
        self.worker: Worker | None = None
        self.queue = ""

    def start_node(self) -> None:
        if self.rabbitmq is not None:
            t0 = time.monotonic()
            self.url = self.rabbitmq.start()
            print(f"RabbitMQ up in {time.monotonic() - t0:.1f} s", flush=True)

    def start(self, server_id: str, procs: int = 2) -> qm.Client:
        """qm-server on base/data-<server_id> (filled beforehand, or empty) and a worker on a
        fresh queue, warmed up with one task; returns a client of the server."""
        self.server = start_server(self.url, self.base, server_id=server_id)
        self.queue = unique("bench-store")
        self.worker = start_worker(self.url, procs=procs, queues=self.queue)
        client = qm.Client(self.server.address)
        client.result(client.submit("math", "1 + 1", queue=self.queue), timeout_s=60.0)
        return client

    def start_extra_server(self, server_id: str) -> tuple[Server, qm.Client]:
        """Another qm-server on the same node, with an empty data dir of its own, submitting
        to the running worker's queue; warmed up with one task."""
        server = start_server(self.url, self.base, server_id=server_id)
        client = qm.Client(server.address)
        client.result(client.submit("math", "1 + 1", queue=self.queue), timeout_s=60.0)
        return server, client

    def stop_extra_server(self, server: Server, client: qm.Client) -> None:
        client.close()
        self._stop_server(server)
        shutil.rmtree(server.data_dir, ignore_errors=True)

    def _stop_server(self, server: Server) -> None:
        """Stop a server and delete its queues, so later runs do not feed them."""
        try:
            server.stop()
        except Exception:  # keep going: everything must stop
            traceback.print_exc()
        delete_queues(self.url, [f"qm.events.{server.server_id}", f"qm.dead.{server.server_id}",
                                 f"qm.heartbeats.{server.server_id}"])

    def stop(self) -> None:
        """Worker, then server."""
        if self.worker is not None:
            try:
                self.worker.stop()
            except Exception:  # keep going: everything must stop
                traceback.print_exc()
            delete_queues(self.url, band_queues(self.queue))
        if self.server is not None:
            self._stop_server(self.server)
        self.server = self.worker = None

    def stop_node(self) -> None:
        self.stop()
        if self.rabbitmq is not None:
            self.rabbitmq.stop()


def submit_many(client: qm.Client, queue: str, count: int, threads: int,
                bound_s: float = SUBMIT_BOUND_S) -> tuple[dict[str, str], list[float], list[str]]:
    """Submit `count` math tasks from `threads` threads (stopping at bound_s); return
    task id -> expected result, each submit's latency in ms, and the first errors seen."""
    deadline = time.monotonic() + bound_s
    lock = threading.Lock()
    expected: dict[str, str] = {}
    latencies: list[float] = []
    errors: list[str] = []

    def run(indices: range) -> None:
        for i in indices:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            try:
                task_id = client.submit("math", f"{i} * 3 + 1", queue=queue)
            except Exception as exc:  # counted and shown; the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            with lock:
                expected[task_id] = str(i * 3 + 1)
                latencies.append(elapsed_ms)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, [range(k, count, threads) for k in range(threads)]))
    return expected, latencies, errors[:5]


def run_round(stack: Stack, client: qm.Client, tasks: int, threads: int,
              server: Server | None = None) -> dict[str, Any]:
    """One round through `server` (default: the stack's): submit, wait until every task is
    terminal; latency, the server's CPU and the rate (task ids under "ids")."""
    server = server or stack.server
    cpu0 = cpu_seconds(server.pid)
    t0 = time.monotonic()
    expected, latencies, errors = submit_many(client, stack.queue, tasks, threads)
    submit_s = time.monotonic() - t0
    ids = list(expected)
    final = wait_all(client, ids, timeout_s=FINISH_BOUND_S) if ids else {}
    wall_s = time.monotonic() - t0
    server_cpu_s = cpu_seconds(server.pid) - cpu0
    states = states_of(final.values())
    wrong = sum(1 for status in final.values()
                if status.state == "SUCCEEDED" and str(status.result) != expected[status.task_id])
    return {
        "tasks": len(ids), "submit_errors": errors, "states": states, "wrong_results": wrong,
        "submit_ms_p50": percentile(latencies, 50), "submit_ms_p99": percentile(latencies, 99),
        "submit_s": submit_s, "wall_s": wall_s, "rate_per_s": len(ids) / wall_s if wall_s else None,
        "server_cpu_s": server_cpu_s, "server_cpu_ms_per_task": 1000.0 * server_cpu_s / max(len(ids), 1),
        "ids": ids,
    }


def _rounded_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _rounded_tree(item) for key, item in value.items()}
    return rounded(value, 2)


def data_dir(base: pathlib.Path, server_id: str) -> pathlib.Path:
    """Where tests.processes.start_server puts this server's data (see qm.server.app)."""
    return base / f"data-{server_id}"


def fill_templates(base: pathlib.Path, sizes: list[int]) -> dict[int, tuple[pathlib.Path, float]]:
    """One filled store file per size (copied for each measurement, never used itself);
    size -> (path, seconds the fill took)."""
    templates = {}
    for size in sizes:
        path = base / "templates" / f"store-{size}.sqlite3"
        fill_s = fill_store(path, size)
        print(f"filled {size:,} tasks in {fill_s:.1f} s ({path.stat().st_size / MIB:.0f} MiB)", flush=True)
        templates[size] = (path, fill_s)
    return templates


def copy_synced(source: pathlib.Path, target: pathlib.Path) -> None:
    """Copy a store file and wait until it is on disk: the kernel writing back hundreds of
    MiB of fresh copy would otherwise compete with the measurement that follows."""
    shutil.copyfile(source, target)
    with open(target, "rb+") as copied:
        os.fsync(copied.fileno())


def measure_once(stack: Stack, size: int, template: pathlib.Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    """In process on one copy of the template, end to end on another: each starts with
    exactly `size` tasks stored."""
    server_id = unique(f"store{size}")
    directory = data_dir(stack.base, server_id)
    directory.mkdir(parents=True)
    scratch = stack.base / f"scratch-{server_id}.sqlite3"
    try:
        copy_synced(template, scratch)
        in_process = measure_store_calls(scratch, args.store_ops, NEW_IDS[args.ids])
        print(f"  in process: {json.dumps(_rounded_tree(in_process))}", flush=True)
        copy_synced(template, directory / f"{server_id}.sqlite3")
        client = stack.start(server_id)
        try:
            end_to_end = run_round(stack, client, args.tasks, args.threads)
            end_to_end.pop("ids")
        finally:
            client.close()
            stack.stop()
        print(f"  end to end: {json.dumps(_rounded_tree(end_to_end))}", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for leftover in stack.base.glob(f"scratch-{server_id}.sqlite3*"):
            leftover.unlink()
    return {"in_process": in_process, "end_to_end": end_to_end}


def median_tree(runs: list[Any]) -> Any:
    """The median of each number across runs of the same shape (other values: the first's)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_tree([run.get(key) for run in runs]) for key in first}
    numbers = [run for run in runs if isinstance(run, (int, float)) and not isinstance(run, bool)]
    if numbers and len(numbers) == len(runs):
        return statistics.median(numbers)
    return first


def bench(stack: Stack, sizes: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fill every size, then measure them in turn, `--repeat` times (interleaved, so what
    else runs on the machine falls on every size alike); medians per size."""
    templates = fill_templates(stack.base, sizes)
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    for repetition in range(args.repeat):
        for size in sizes:
            print(f"repetition {repetition + 1}/{args.repeat}: {size:,} stored ...", flush=True)
            runs[size].append(measure_once(stack, size, templates[size][0], args))
    return [{"size": size, "fill_s": templates[size][1], "runs": runs[size], **median_tree(runs[size])}
            for size in sizes]


# -- report -------------------------------------------------------------------------------

ROWS = (("submit ms p50", ("end_to_end", "submit_ms_p50")),
        ("submit ms p99", ("end_to_end", "submit_ms_p99")),
        ("server CPU ms/task", ("end_to_end", "server_cpu_ms_per_task")),
        ("end-to-end tasks/s", ("end_to_end", "rate_per_s")),
        ("store: find key us (CPU)", ("in_process", "find_key", "cpu_us")),
        ("store: insert+confirm us (CPU)", ("in_process", "insert_confirm", "cpu_us")),
        ("store: apply events/CPU s", ("in_process", "apply", "events_per_cpu_s")),
        ("store: apply events/s (wall)", ("in_process", "apply", "events_per_s")),
        ("store: batched task us (CPU)", ("in_process", "batched", "cpu_us_per_task")),
        ("store: both counts us (CPU)", ("in_process", "counts", "cpu_us")))


def _value(result: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def _short(value: float, digits: int) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def print_report(results: list[dict[str, Any]]) -> None:
    base = results[0]
    header = ["measure"] + [f"{r['size']:,} stored" for r in results]
    lines = [header]
    for label, path in ROWS:
        line = [label]
        for r in results:
            value, reference = _value(r, path), _value(base, path)
            text = _short(value, 2) if isinstance(value, float) else str(value)
            if r is not base and isinstance(value, float) and reference:
                text += f" ({100.0 * (value - reference) / reference:+.0f} %)"
            spread = [_value(run, path) for run in r["runs"]]
            if len(spread) > 1 and all(isinstance(v, (int, float)) for v in spread):
                text += f" [{_short(min(spread), 1)}-{_short(max(spread), 1)}]"
            line.append(text)
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    print(f"  (medians of {len(base['runs'])} runs per size, against the first size; "
          "[lowest-highest run])")
    for r in results:
        runs = [run["end_to_end"] for run in r["runs"]]
        states: Counter = Counter()
        for run in runs:
            states.update(run["states"])
        errors = [error for run in runs for error in run["submit_errors"]]
        print(f"  {r['size']:,} stored: {sum(run['tasks'] for run in runs)} tasks, states {dict(states)}, "
              f"wrong results {sum(run['wrong_results'] for run in runs)}, submit errors {errors or 'none'}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Server cost against store size (loopback, self-contained).")
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                        help="finished tasks to pre-populate, comma-separated (default %(default)s)")
    parser.add_argument("--tasks", type=int, default=1500, help="tasks submitted end to end per size")
    parser.add_argument("--threads", type=int, default=16, help="client threads submitting")
    parser.add_argument("--store-ops", type=int, default=2000, help="calls per in-process measurement")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurements per size, interleaved across sizes; the table shows medians")
    parser.add_argument("--ids", choices=sorted(NEW_IDS), default="time",
                        help="ids and keys of the tasks the in-process phase adds: time-ordered as the server "
                             "and qm.Client make them (default), or random (uuid4) as before 3 December 2026")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--broker-url", default="", metavar="URL",
                        help="use this RabbitMQ instead of starting a private node (the smoke test does)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]

    report: dict[str, Any] = {"meta": {
        "started_at": time.time(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(), "memory_mib": psutil.virtual_memory().total // MIB,
        "platform": platform.platform(), "tasks": args.tasks, "threads": args.threads, "repeat": args.repeat}}
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="qm-bench-store-") as tmp:
        stack = Stack(pathlib.Path(tmp), args.broker_url)
        try:
            stack.start_node()
            results = bench(stack, sizes, args)
        finally:
            stack.stop_node()
    report["sizes"] = results
    report["meta"]["total_wall_s"] = time.monotonic() - started
    if results:
        print_report(results)
    print(f"\ntotal wall time {report['meta']['total_wall_s']:.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
