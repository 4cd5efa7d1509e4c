"""Task types for QueueMaster's own tests: each does one thing a test needs to observe.

Installed only in test environments (scripts/setup --test); the product never ships them.
"""
import os
import time


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


def exit_now(payload: str) -> str:
    """Leave the process at once with os._exit(payload as int)."""
    os._exit(int(payload or 3))


def pid(payload: str) -> str:
    """Return the pid of the process running the task."""
    return str(os.getpid())
