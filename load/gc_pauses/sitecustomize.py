"""Records a process's full garbage collections, for load/bench_submit_ab.py --gc-pauses.

Put on PYTHONPATH (first) with GC_PAUSES_DIR set, Python imports this at start-up in
every process it starts; each keeps, in memory, per generation the count and total ms of
its collections, and each generation-2 (full) pass as [CLOCK_MONOTONIC seconds at its
end, ms], and writes them to `<pid>.json` in that directory once, as it exits normally
(a qm-server stopped with SIGTERM does): no file I/O inside the process being measured.
The clock is the host's, so a benchmark can keep only the passes of its measured span.
Nothing is recorded without GC_PAUSES_DIR.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import pathlib
import time

_DIR = os.environ.get("GC_PAUSES_DIR")


def _install(out_dir: pathlib.Path) -> None:
    counts = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    full_passes: list[list[float]] = []
    started: dict[int, float] = {}

    def on_collection(phase: str, info: dict) -> None:
        generation = info["generation"]
        if phase == "start":
            started[generation] = time.perf_counter()
            return
        took_ms = 1e3 * (time.perf_counter() - started.pop(generation, time.perf_counter()))
        counts[generation][0] += 1
        counts[generation][1] += took_ms
        if generation == 2:
            full_passes.append([time.monotonic(), took_ms])

    def write_record() -> None:
        record = {"counts": counts, "full_passes": full_passes}
        (out_dir / f"{os.getpid()}.json").write_text(json.dumps(record), encoding="utf-8")

    gc.callbacks.append(on_collection)
    atexit.register(write_record)


if _DIR:
    _install(pathlib.Path(_DIR))
