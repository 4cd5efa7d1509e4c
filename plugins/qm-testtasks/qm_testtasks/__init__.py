"""Task types for QueueMaster's own tests: each does one thing a test needs to observe.

Installed only in test environments (scripts/setup --test); the product never ships them.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import qm
from qm.registry import TaskType

_LEAKED: list[bytearray] = []


def echo(payload: str) -> str:
    """Return the payload unchanged."""
    return payload


def fail(payload: str) -> str:
    """Raise RuntimeError with the payload as its message."""
    raise RuntimeError(payload or "failing on purpose")


def sleep(payload: str) -> str:
    """Sleep for the payload's number of seconds (float); return it."""
    seconds = float(payload)
    time.sleep(seconds)
    return payload


def spin(payload: str) -> str:
    """Burn pure-Python CPU for the payload's number of seconds; return the loop count."""
    deadline = time.monotonic() + float(payload)
    count = 0
    while time.monotonic() < deadline:
        count += 1
    return str(count)


def spin_timed(payload: str) -> str:
    """test.spin, timed by the child itself: "PID START END LOOPS", the times from
    time.time() just before and after the spin. A benchmark pairs one task's END with the
    next START of the same PID: how long the child sat idle between two tasks."""
    started = time.time()
    loops = spin(payload)
    return f"{os.getpid()} {started:.6f} {time.time():.6f} {loops}"


def exit_now(payload: str) -> str:
    """Leave the process at once with os._exit(payload as int)."""
    os._exit(int(payload or 3))


def garble_pipe(payload: str) -> str:
    """Write what is not a reply on every pipe connection this process holds (task code
    scribbling on its worker's pipe), then sleep `payload` seconds (default 60)."""
    import gc
    import multiprocessing.connection

    for obj in gc.get_objects():
        if isinstance(obj, multiprocessing.connection.Connection) and not obj.closed and obj.writable:
            try:
                obj.send_bytes(b"\x07 not a reply")
            except OSError:
                pass
    time.sleep(float(payload or 60))
    return "not killed"


def pid(payload: str) -> str:
    """Return the pid of the process running the task."""
    return str(os.getpid())


def alloc(payload: str) -> str:
    """Allocate and touch the payload's MiB as fast as possible, in 64 MiB chunks; hold it briefly."""
    total_mb = int(payload)
    held = [b"\x01" * (min(64, total_mb - done) * 1024 * 1024) for done in range(0, total_mb, 64)]
    time.sleep(0.5)
    return str(sum(len(chunk) for chunk in held) // (1024 * 1024))


def segfault(payload: str) -> str:
    """Dereference a null pointer in C: the process dies with SIGSEGV."""
    ctypes.string_at(0)
    return "unreachable"


def spawn_and_wait(payload: str) -> str:
    """Payload "SECONDS" or "SECONDS:PIDFILE": start a grandchild process that sleeps that
    long (and write its pid to PIDFILE once it runs); wait for it; return its pid."""
    seconds, _, pid_file = payload.partition(":")
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({float(seconds)})"])
    if pid_file:
        _write_atomically(pid_file, str(child.pid))
    child.wait()
    return str(child.pid)


def leave_behind(payload: str) -> str:
    """Start a subprocess that sleeps the payload's seconds, from a thread of its own (its
    parent is that thread, not the main one), and return its pid without waiting for it."""
    import threading

    started: list[subprocess.Popen] = []
    runner = threading.Thread(
        target=lambda: started.append(
            subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({float(payload)})"])
        )
    )
    runner.start()
    runner.join()
    return str(started[0].pid)


def spawn_alloc(payload: str) -> str:
    """Payload "COUNT:MIB:SECONDS": start COUNT subprocesses that each allocate and touch
    MIB MiB and hold it for SECONDS; wait for them; return the MiB they held together.
    The task's own process allocates nothing: its memory is all in its subprocesses."""
    count, mib, seconds = payload.split(":")
    code = f"import time; held = b'\\x01' * ({int(mib)} * 1024 * 1024); time.sleep({float(seconds)})"
    children = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(int(count))]
    codes = [child.wait() for child in children]
    if any(codes):
        raise RuntimeError(f"subprocesses exited with {codes}")
    return str(int(count) * int(mib))


def grow(payload: str) -> str:
    """Payload "TOTAL_MIB:MIB_PER_S": allocate and touch memory in 16 MiB chunks at about
    MIB_PER_S until TOTAL_MIB is held; return the MiB held. A paced allocation: how far it
    gets past a limit depends on the watchdog, much less on how fast this machine is."""
    total_mib, rate = payload.split(":")
    chunk_mib = 16
    pause_s = chunk_mib / float(rate)
    held = []
    while len(held) * chunk_mib < int(total_mib):
        held.append(b"\x01" * (chunk_mib * 1024 * 1024))
        time.sleep(pause_s)
    return str(len(held) * chunk_mib)


def wait_for(payload: str) -> str:
    """Payload "BOUND_S:PATH": block until PATH exists (a gate the test opens), at most
    BOUND_S seconds; return the payload. Past the bound, fail saying so. Lets a test hold a
    task running for exactly as long as it needs, whatever the machine's speed."""
    bound_s, _, path = payload.partition(":")
    deadline = time.monotonic() + float(bound_s)
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise RuntimeError(f"gate {path} was not opened within {bound_s} s")
        time.sleep(0.01)
    return payload


def _write_atomically(path: str, text: str) -> None:
    """Write a file that a reader never sees half-written (write aside, then rename)."""
    partial = f"{path}.partial"
    with open(partial, "w") as file:
        file.write(text)
    os.replace(partial, path)


def soft_timeout_cleanup(payload: str) -> str:
    """Sleep the payload's seconds; on qm.SoftTimeout return 'cleaned up'."""
    try:
        time.sleep(float(payload))
    except qm.SoftTimeout:
        return "cleaned up"
    return "finished"


def stubborn(payload: str) -> str:
    """Ignore SIGTERM, SIGINT and SIGALRM, then busy-loop the payload's seconds."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, signal.SIG_IGN)
    deadline = time.monotonic() + float(payload)
    while time.monotonic() < deadline:
        pass
    return "done"


def leak(payload: str) -> str:
    """Keep the payload's MiB alive in this process after the task returns; return the pid."""
    _LEAKED.append(bytearray(b"\x01" * (int(payload) * 1024 * 1024)))
    return str(os.getpid())


def flaky(payload: str) -> str:
    """Payload "PATH:N": fail the first N runs (counted in the file PATH), then succeed."""
    path, _, failures = payload.rpartition(":")
    with open(path, "a+") as counter:
        counter.write("x")
        counter.seek(0)
        runs = len(counter.read())
    if runs <= int(failures):
        raise RuntimeError(f"flaky failure {runs} of {failures}")
    return f"succeeded on run {runs}"


def ask_retry(payload: str) -> str:
    """Raise qm.Retry with the payload as its delay in seconds."""
    raise qm.Retry("asked for a retry", delay_s=float(payload))


def permanent(payload: str) -> str:
    """Raise qm.PermanentError: fail without retrying."""
    raise qm.PermanentError(payload or "this will never work")


def kill_worker(payload: str) -> str:
    """SIGKILL the qm-worker supervisor running this task (the nearest ancestor whose
    command line names qm-worker), like a task that takes its whole host down."""
    import psutil

    for ancestor in psutil.Process().parents():
        if any("qm-worker" in part for part in ancestor.cmdline()):
            ancestor.kill()
            break
    time.sleep(5)
    return "no qm-worker ancestor found"


def spawn_and_spin(payload: str) -> str:
    """Payload "SECONDS TAG": start a subprocess that spins SECONDS with TAG on its command
    line (so a test can find every copy on the host), spin SECONDS here too, then stop it."""
    seconds, tag = payload.split()
    loop = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass"
    helper = subprocess.Popen([sys.executable, "-c", loop, seconds, tag])
    spin(seconds)
    helper.kill()
    helper.wait()
    return tag


def hold_gil(payload: str) -> str:
    """Hold the GIL in native code (regex backtracking of 2**N steps) without a pause:
    no other thread of the process can run until it ends."""
    import re

    return str(bool(re.match(r"(a+)+$", "a" * int(payload) + "b")))


def progress_steps(payload: str) -> str:
    """Payload "STEPS:PAUSE_S[:GATE]": report progress (k/STEPS, "step k", {"step": k})
    STEPS times, PAUSE_S apart; with GATE, after the first report wait for that file (at
    most 120 s) before the rest. Return "done STEPS"."""
    steps_text, pause_text, *gate = payload.split(":", 2)
    steps, pause_s = int(steps_text), float(pause_text)
    for step in range(1, steps + 1):
        qm.progress(step / steps, f"step {step}", {"step": step})
        if gate and step == 1:
            wait_for(f"120:{gate[0]}")
        time.sleep(pause_s)
    return f"done {steps}"


def progress_spam(payload: str) -> str:
    """Payload "N[:SPREAD_S]": call qm.progress N times, as fast as it can or spread over
    about SPREAD_S seconds of work, then return "spammed N"."""
    count_text, _, spread_text = payload.partition(":")
    count = int(count_text)
    pause_s = float(spread_text or 0) / count
    for index in range(count):
        qm.progress((index + 1) / count, f"call {index + 1}")
        if pause_s:
            time.sleep(pause_s)
    return f"spammed {count}"


def big_result(payload: str) -> str:
    """Return a result of the payload's number of bytes (the worker's result cap)."""
    return "x" * int(payload)


def _validate_slowly(value) -> None:
    """Sleep for value["validate_sleep_s"] when given: a validator that takes its time."""
    if isinstance(value, dict):
        time.sleep(float(value.get("validate_sleep_s", 0)))


#: A JSON task type whose server-side validator can be made slow (the validator budget);
#: it returns its payload.
def _return_value(value):
    return value


json_check = TaskType("test.json_check", handler=_return_value, codec="json", validate=_validate_slowly,
                      description="returns its JSON payload; validate_sleep_s makes its validator slow")


def _record_group(document: dict) -> dict:
    """A group callback: append one JSON line (its task's view of the group) to the file its
    own payload names ({"log": PATH}), so a test counts how often it ran; return the sum of
    the numeric results and the failed members' indexes."""
    numbers = []
    for value in document["results"]:
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            pass
    summary = {"group_id": document["group_id"], "sum": sum(numbers), "count": len(numbers),
               "results": document["results"], "failed": [failure["index"] for failure in document["failures"]],
               "errors": [failure["error"] for failure in document["failures"]]}
    log_path = (document.get("payload") or {}).get("log")
    if log_path:
        with open(log_path, "a") as log:
            log.write(json.dumps(summary) + "\n")
    return summary


group_record = TaskType("test.group_record", handler=_record_group, codec="json",
                        description="group callback: logs each run to payload.log, returns the sum of numeric results")


def _slot_probe(value):
    """JSON {"hold_s": S, "started_file": PATH, "gate": GATE}: what the task was allowed,
    and when it ran.

    Writes PATH (if given) as it starts; holds S seconds, then waits for the file GATE (if
    given; at most 120 s), unless PATH existed already (a rerun after its worker died: it
    goes straight on). Returns its CPU affinity, qm.task_cpus(),
    QM_TASK_CPUS as its subprocesses see it, and its start and end (wall clock, one for the
    host), so a test can check what ran at the same time."""
    value = value or {}
    started_at = time.time()
    path = value.get("started_file")
    rerun = bool(path) and os.path.exists(path)
    if path and not rerun:
        _write_atomically(path, str(os.getpid()))
    if not rerun:
        time.sleep(float(value.get("hold_s", 0)))
        if value.get("gate"):
            wait_for(f"120:{value['gate']}")
    seen_by_child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('QM_TASK_CPUS', ''))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return {
        "affinity": sorted(os.sched_getaffinity(0)),
        "task_cpus": qm.task_cpus(),
        "subprocess_env": seen_by_child,
        "started_at": started_at,
        "ended_at": time.time(),
        "rerun": rerun,
    }


#: The probe as a single-CPU type (cpus per submission) and as a type declaring cpus=2.
slot_probe = TaskType("test.slot_probe", handler=_slot_probe, codec="json",
                      description="reports its CPU allowance and when it ran")
slot_probe2 = TaskType("test.slot_probe2", handler=_slot_probe, codec="json", cpus=2,
                       description="reports its CPU allowance and when it ran; takes 2 CPUs")
