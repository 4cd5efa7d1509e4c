"""`qm watch` on a task reporting progress, as a user runs it: a bar redrawn in place on
a terminal (a real pseudo-terminal here), plain "RUNNING 40% step 2" lines in a pipe;
`qm run` prints the reports on stderr.

Each task reports step 1 of 5 and then waits on a gate that the test opens only once
`qm watch` has shown that step: the command sees the steps however slowly it starts."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from tests.processes import COMMAND_TIMEOUT_S, clean_env, command

pytestmark = pytest.mark.timeout(300)

#: Size of the pseudo-terminal: wide enough for the id, the bar and the message.
COLUMNS, ROWS = 120, 40


class Output:
    """Everything a `qm watch` wrote on one file descriptor, read as it comes (bounded)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""

    def read_until(self, pattern: str, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.text):
            left_s = deadline - time.monotonic()
            assert left_s > 0, f"{pattern!r} not shown within {timeout_s} s: {self.text!r}"
            if not self._read(left_s):
                raise AssertionError(f"qm watch ended before showing {pattern!r}: {self.text!r}")

    def read_to_end(self, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while self._read(max(0.0, deadline - time.monotonic())):
            assert time.monotonic() < deadline, f"qm watch did not end: {self.text!r}"
        return self.text

    def _read(self, timeout_s: float) -> bool:
        """One read; False at the end of the output (EOF, or EIO on a pty whose writer left)."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:
            return False
        self.text += chunk.decode(errors="replace")
        return bool(chunk)


def start_watch(server: str, task_id: str, terminal: bool) -> tuple[subprocess.Popen, Output]:
    argv = [command("qm"), "--server", server, "watch", task_id]
    if not terminal:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, env=clean_env(None))
        assert process.stdout is not None
        return process, Output(process.stdout.fileno())
    controller, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    process = subprocess.Popen(argv, stdout=tty, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               env=clean_env(None))
    os.close(tty)
    return process, Output(controller)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_qm_watch_shows_each_step_then_the_outcome(stack, gates, terminal):
    gate = gates()
    task_id = stack.client.submit("test.progress", f"5:0.3:{gate.path}", queue=stack.queue)
    process, output = start_watch(stack.server.address, task_id, terminal)
    try:
        first = (rf"\r\x1b\[K{task_id} \[#{{6}}\.{{24}}\]  20% step 1" if terminal
                 else rf"{task_id} RUNNING 20% step 1\r?\n")
        output.read_until(first)
        gate.open()
        out = output.read_to_end()
        returncode = process.wait(COMMAND_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(COMMAND_TIMEOUT_S)
    assert returncode == 0, out
    if terminal:
        bars = re.findall(rf"\r\x1b\[K{task_id} \[([#.]{{30}})\] +(\d+)% step (\d)", out)
        percents = [int(percent) for _, percent, _ in bars]
        assert len(bars) >= 2 and percents == sorted(percents), repr(out)
        assert all(bar.count("#") == round(int(percent) * 30 / 100) for bar, percent, _ in bars), repr(out)
        # The bar is erased before the outcome's line: no bar text precedes it on its line.
        assert re.search(rf"\r\x1b\[K\S+ {task_id} SUCCEEDED done 5\r\n$", out), repr(out)
    else:
        reports = re.findall(rf"{task_id} RUNNING (\d+)% step (\d)$", out, re.MULTILINE)
        assert len(reports) >= 2 and all(int(percent) == 20 * int(step) for percent, step in reports), out
        assert "\x1b" not in out and out.rstrip().endswith(f"{task_id} SUCCEEDED done 5"), out


def test_qm_run_prints_the_reports_on_stderr_and_the_result_on_stdout():
    ran = subprocess.run([command("qm"), "run", "-T", "test.progress", "-P", "3:0.2"], capture_output=True,
                         text=True, timeout=COMMAND_TIMEOUT_S, env=clean_env(None), stdin=subprocess.DEVNULL)
    assert ran.returncode == 0 and ran.stdout == "done 3\n", ran
    lines = ran.stderr.splitlines()
    assert lines and all(re.fullmatch(r"progress (33|67|100)% step [123]", line) for line in lines), ran.stderr
