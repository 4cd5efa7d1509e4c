"""A local service started in a process group of its own, stopped as a whole group."""

from __future__ import annotations

import os
import signal
import subprocess

#: Longest wait for a service to stop before it is SIGKILLed (and for the kill to be reaped).
STOP_TIMEOUT_S = 30.0


class GroupService:
    """Base of the local RabbitMQ and PostgreSQL launchers: `self.process` was started with
    `start_new_session=True`, so a signal to its group reaches everything it started.
    `stop` sends `STOP_SIGNAL` and SIGKILLs the group if it lingers; `kill` is a crash."""

    STOP_SIGNAL = signal.SIGTERM
    process: subprocess.Popen | None = None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """`STOP_SIGNAL` to the whole group, then SIGKILL if it is not gone in `timeout_s`."""
        self._signal(self.STOP_SIGNAL)
        try:
            if self.process is not None:
                self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """SIGKILL of the whole group: a crash; data stays for the next start."""
        self._signal(signal.SIGKILL)
        self._reap()

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        if self.process is not None:
            group = self.process.pid  # its own session: the group id is its pid
            self.process.wait(STOP_TIMEOUT_S)
            self.process = None
            self._after_reap(group)

    def _after_reap(self, group: int) -> None:
        """What a service needs done once its main process is gone (nothing by default)."""
