"""Start the installed QueueMaster commands as real subprocesses, for integration and e2e tests.

    server = start_server(rabbitmq.url, tmp_path)        # waits for "listening on ... (port N)"
    worker = start_worker(rabbitmq.url, procs=2, queues="q1")   # waits for "worker ... consuming"
    ...
    worker.stop(); server.stop()                          # SIGTERM, then SIGKILL if it lingers

Each process's stdout and stderr are read by background threads into buffers, so a test
can wait (always bounded) for a log line and show the logs in its assertion messages.
Nothing here sleeps and hopes: every wait is for a condition, with a deadline.

The `Launcher` (the `launcher` fixture in tests/conftest.py) remembers what it started and
cleans up in teardown: every process and its descendants end, and the durable RabbitMQ
queues a test created (its server's events queue, its work queues) are deleted, since
all tests share one node. A server started with `kept_id=True` gets no --server-id: its id
is the one it keeps in its data dir (`Server.server_id` reads it), and teardown deletes
that id's queue too.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Iterable, Iterator, NamedTuple, Sequence

import pika
import psutil

#: The venv's bin directory: where the console scripts qm, qm-server and qm-worker live.
BIN_DIR = pathlib.Path(sys.executable).parent
#: Bound on a server or worker becoming ready (imports, broker connection, forkserver).
START_TIMEOUT_S = 60.0
#: Bound on a graceful stop before SIGKILL.
STOP_TIMEOUT_S = 20.0
#: Bound on a `qm` command run to completion.
COMMAND_TIMEOUT_S = 90.0

SERVER_READY = re.compile(r"listening on (?P<listen>\S+) \(port (?P<port>\d+)\)")
WORKER_READY = re.compile(r"worker (?P<id>\S+) consuming ")


def command(name: str) -> str:
    path = BIN_DIR / name
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is not installed; install the package in the venv")
    return str(path)


def unique(kind: str) -> str:
    """A name no other test uses: queue names, server ids, worker ids."""
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test runner's environment without any QM_* variable (they would configure the
    process under test) nor COLUMNS / LINES (pytest-xdist workers set 80x24, which would
    override the size of the terminal a test gives a command), plus `extra`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("QM_") and key not in ("COLUMNS", "LINES")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ProcessExited(AssertionError):
    """The process ended while a test was waiting for it to get ready."""


class Process:
    """A started command: its output buffered line by line, waits, stop and kill."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self.name = name
        self.args = list(args)
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        # Own session: a Ctrl-C (SIGINT to the process group) reaches only this command,
        # and the test runner's terminal never signals it.
        self.process = subprocess.Popen(self.args, env=clean_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True)
        self._readers = [threading.Thread(target=self._read, args=(stream, kind), daemon=True,
                                          name=f"{name}-{kind}")
                         for stream, kind in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr"))]
        for reader in self._readers:
            reader.start()

    # -- output ------------------------------------------------------------------------

    def _read(self, stream, kind: str) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                self._lines[kind].append(raw.decode("utf-8", errors="replace").rstrip("\n"))
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        with self._changed:
            return "\n".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self._lines["stderr"])

    @property
    def logs(self) -> str:
        """stderr (where the commands log), then any stdout; for assertion messages."""
        text = f"--- {self.name} (pid {self.pid}, {' '.join(self.args)}) stderr ---\n{self.stderr}"
        if self.stdout:
            text += f"\n--- {self.name} stdout ---\n{self.stdout}"
        return text

    def wait_for_line(self, pattern: str | re.Pattern, timeout_s: float, stream: str = "stderr",
                      start: int = 0) -> re.Match:
        """The first line (from index `start`) matching `pattern`, waiting up to timeout_s."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self._lines[stream][start:]:
                    match = regex.search(line)
                    if match:
                        return match
                if self.process.poll() is not None and not any(r.is_alive() for r in self._readers):
                    raise ProcessExited(f"{self.name} exited with {self.process.returncode} before logging "
                                        f"{regex.pattern!r}\n{self.logs}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} did not log {regex.pattern!r} within {timeout_s} s\n"
                                       f"{self.logs}")
                self._changed.wait(min(left, 0.5))

    def line_count(self, stream: str = "stderr") -> int:
        with self._changed:
            return len(self._lines[stream])

    # -- lifecycle ---------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int, group: bool = False) -> None:
        if self.process.poll() is not None:
            return
        try:
            if group:
                os.killpg(self.pid, signum)
            else:
                self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout_s: float) -> int:
        """The exit code, waiting up to timeout_s (raises subprocess.TimeoutExpired)."""
        code = self.process.wait(timeout_s)
        for reader in self._readers:
            reader.join(timeout_s)
        return code

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it is still running after timeout_s; the exit code.
        Descendants still alive afterwards are killed too."""
        family = self.descendants()
        self.signal(signal.SIGTERM)
        try:
            code = self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = self.kill()
        kill_all(family)
        return code

    def kill(self) -> int:
        """SIGKILL this process only (as `kill -9 PID` does); its exit code."""
        self.signal(signal.SIGKILL)
        return self.wait(STOP_TIMEOUT_S)


class Server(Process):
    """A running qm-server; `address` is what clients dial."""

    def __init__(self, args: Sequence[str], server_id: str | None, data_dir: pathlib.Path,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(f"qm-server {server_id or data_dir.name}", args, env)
        self._server_id = server_id
        self.data_dir = data_dir
        self.port = 0

    @property
    def server_id(self) -> str | None:
        """The --server-id it was given, else the id it keeps in its data dir (None before it
        recorded one)."""
        if self._server_id:
            return self._server_id
        try:
            return (self.data_dir / "server-id").read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Worker(Process):
    def __init__(self, args: Sequence[str], worker_id: str, queues: list[str],
                 env: dict[str, str] | None = None) -> None:
        super().__init__(f"qm-worker {worker_id}", args, env)
        self.worker_id = worker_id
        self.queues = queues


#: What test servers get unless a test says otherwise (see start_server).
TEST_SERVER_ENV = {"QM_SERVER__QUEUES": "*", "QM_SERVER__SUBMIT_RATE_PER_S": "0"}


def start_server(broker_url: str, tmp_path: pathlib.Path, *, server_id: str | None = None,
                 kept_id: bool = False, data_dir: pathlib.Path | None = None,
                 env: dict[str, str] | None = None, log_level: str | None = None,
                 extra_args: Iterable[str] = (), timeout_s: float = START_TIMEOUT_S,
                 wait_ready: bool = True) -> Server:
    """Start qm-server on 127.0.0.1:0 with its own data dir (or `data_dir`); wait until it is
    serving (unless wait_ready=False: for a server expected to refuse to start).

    It gets --server-id (`server_id`, else a unique one) unless kept_id=True: then it uses
    the id kept in its data dir, generated on its first start there. Tests make up their
    own queue names and submit in bursts, so unless `env` says otherwise the server
    accepts every valid queue name and has no submit rate limit (TEST_SERVER_ENV); the
    caps themselves are tested in tests/security.
    """
    env = {**TEST_SERVER_ENV, **(env or {})}
    if kept_id:
        assert server_id is None, "kept_id=True means no --server-id"
        data_dir = data_dir or tmp_path / unique("data")
    else:
        server_id = server_id or unique("server")
        data_dir = data_dir or tmp_path / f"data-{server_id}"
    args = [command("qm-server"), "--listen", "127.0.0.1:0", "--broker-url", broker_url,
            "--data-dir", str(data_dir)] + ([] if kept_id else ["--server-id", server_id])
    if log_level:
        args += ["--log-level", log_level]
    server = Server(args + list(extra_args), server_id, data_dir, env)
    if not wait_ready:
        return server
    try:
        server.port = int(server.wait_for_line(SERVER_READY, timeout_s).group("port"))
    except BaseException:
        server.stop()
        raise
    return server


def start_worker(broker_url: str, procs: int = 2, queues: str | Sequence[str] = "default", *,
                 worker_id: str | None = None, prefetch: str | int | None = None,
                 env: dict[str, str] | None = None, log_level: str | None = None,
                 extra_args: Iterable[str] = (), timeout_s: float = START_TIMEOUT_S,
                 wait_ready: bool = True) -> Worker:
    """Start qm-worker on the given logical queue(s); wait until it is consuming (unless
    wait_ready=False: for a worker a task may kill before it even logs that it is ready)."""
    queue_list = [queues] if isinstance(queues, str) else list(queues)
    worker_id = worker_id or unique("worker")
    args = [command("qm-worker"), "--procs", str(procs), "--broker-url", broker_url,
            "--queues", ",".join(queue_list), "--worker-id", worker_id]
    if prefetch is not None:
        args += ["--prefetch", str(prefetch)]
    if log_level:
        args += ["--log-level", log_level]
    worker = Worker(args + list(extra_args), worker_id, queue_list, env)
    if not wait_ready:
        return worker
    try:
        worker.wait_for_line(WORKER_READY, timeout_s)
    except BaseException:
        worker.stop()
        raise
    return worker


class Stack(NamedTuple):
    """What `local_stack` started: the broker's URL, the server, the worker, their directory."""

    url: str
    server: Server
    worker: Worker
    base: pathlib.Path


@contextlib.contextmanager
def local_stack(prefix: str, procs: int = 2, queues: str | Sequence[str] = "default") -> Iterator[Stack]:
    """A private RabbitMQ, one qm-server and one `qm-worker --procs N` in a temporary
    directory (for load/ benchmarks); the worker, the server and the broker are stopped and
    the directory removed on the way out, however it is left."""
    from qm.testing.rabbitmq import LocalRabbitMQ

    with tempfile.TemporaryDirectory(prefix=prefix) as base_dir:
        base = pathlib.Path(base_dir)
        rabbitmq = LocalRabbitMQ(base / "rabbitmq")
        started: list[Process] = []
        try:
            url = rabbitmq.start()
            started.append(start_server(url, base))
            started.append(start_worker(url, procs=procs, queues=queues))
            server, worker = started
            assert isinstance(server, Server) and isinstance(worker, Worker)
            yield Stack(url, server, worker, base)
        finally:
            for process in reversed(started):
                process.stop()
            rabbitmq.stop()


def run_qm(*args: str, server: str | None = None, env: dict[str, str] | None = None,
           input: str | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `qm [--server ADDRESS] ARGS...` to completion (bounded); text output captured."""
    argv = [command("qm")] + (["--server", server] if server else []) + list(args)
    return subprocess.run(argv, env=clean_env(env), input=input, capture_output=True, text=True,
                          timeout=timeout_s, stdin=None if input is not None else subprocess.DEVNULL)


def run_bounded(argv: Sequence[str], timeout_s: float,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion, text output captured, like subprocess.run with a
    timeout, except that the bound takes its whole tree down: a load/ script starts its
    own RabbitMQ, PostgreSQL, servers and workers in sessions of their own, and
    subprocess.run kills only the script, leaving those running for good. On timeout every
    descendant is SIGKILLed with it, then TimeoutExpired is raised."""
    with subprocess.Popen(list(argv), env=clean_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                tree = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            process.kill()
            kill_all(tree)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout_s, stdout, stderr) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_all(processes: Iterable[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def gone(process: psutil.Process) -> bool:
    """Whether a (possibly not our own child) process has ended; a zombie has ended."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, timeout_s: float, interval_s: float = 0.1, message: str = "condition"):
    """Poll `condition()` until it returns a truthy value (returned) or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout_s} s")
        time.sleep(interval_s)


#: How long a gated task (test.wait_for) waits for its gate before failing: far beyond
#: what any test needs, so only a gate a test forgot to open makes the task fail.
GATE_BOUND_S = 120.0


class Gate:
    """A file a `test.wait_for` task blocks on until the test opens the gate: the task runs
    for exactly as long as the test needs, however fast or slow the machine is.

        gate = Gate(tmp_path)
        task_id = client.submit("test.wait_for", gate.payload, queue=queue)
        ...                       # the task is running, and stays so
        gate.open()               # now it returns its payload
    """

    def __init__(self, directory: pathlib.Path, name: str | None = None) -> None:
        self.path = directory / (name or unique("gate"))

    @property
    def payload(self) -> str:
        return f"{GATE_BOUND_S:g}:{self.path}"

    def open(self) -> None:
        self.path.touch()

    @property
    def opened(self) -> bool:
        return self.path.exists()


def delete_queues(broker_url: str, queues: Iterable[str]) -> None:
    """Delete AMQP queues (best effort: the node may be gone)."""
    queues = list(queues)
    if not queues:
        return
    try:
        params = pika.URLParameters(broker_url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        with pika.BlockingConnection(params) as connection:
            channel = connection.channel()
            for queue in queues:
                channel.queue_delete(queue)
    except pika.exceptions.AMQPError:
        pass


def band_queues(queue: str) -> list[str]:
    """The AMQP work queues of a logical queue: one per priority band (qm/priority.py)."""
    from qm import priority
    from qm.broker import topology

    return [topology.work_queue_name(queue, priority=band) for band in priority.band_priorities()]


class Launcher:
    """Starts servers and workers for one test and cleans all of them up afterwards."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Process] = []
        self._queues: dict[str, set[str]] = {}
        self._servers: list[tuple[str, Server]] = []
        #: --log-level of the workers started without one (the fault suite's: DEBUG, for
        #: the line each attempt logs, a success's included: tests/faults/support.py).
        self.worker_log_level: str | None = None

    def server(self, broker_url: str, **kwargs) -> Server:
        server = start_server(broker_url, self.tmp_path, **kwargs)
        self.started.append(server)
        self._servers.append((broker_url, server))
        return server

    def worker(self, broker_url: str, procs: int = 2, queues: str | Sequence[str] = "default",
               **kwargs) -> Worker:
        kwargs.setdefault("log_level", self.worker_log_level)
        worker = start_worker(broker_url, procs, queues, **kwargs)
        self.started.append(worker)
        self._queues.setdefault(broker_url, set()).update(
            name for queue in worker.queues if queue != "default" for name in band_queues(queue))
        self._queues[broker_url].update(  # the work queues of multi-CPU task sizes it declared
            f"qm.tasks.{queue}.cpus{cpus}" for queue in worker.queues if queue != "default"
            for cpus in range(2, procs + 1))
        return worker

    def queue(self, broker_url: str) -> str:
        """A fresh logical queue name for this test, its AMQP queue deleted in teardown."""
        name = unique("q")
        self._queues.setdefault(broker_url, set()).update(band_queues(name))
        return name

    def track_queue(self, broker_url: str, amqp_queue: str) -> None:
        """Delete this AMQP queue in teardown too (e.g. a server's dead-letter queue)."""
        self._queues.setdefault(broker_url, set()).add(amqp_queue)

    def forget_queues(self, broker_url: str) -> None:
        """Do not delete queues on this broker in teardown (e.g. a private node, gone by then)."""
        self._queues.pop(broker_url, None)
        self._servers = [(url, server) for url, server in self._servers if url != broker_url]

    def cleanup(self) -> None:
        """Workers first (they hold tasks), then servers; then the test's queues."""
        for process in sorted(self.started, key=lambda p: not isinstance(p, Worker)):
            process.stop()
        for broker_url, server in self._servers:  # an id kept in a data dir is known only now
            if server.server_id:
                self._queues.setdefault(broker_url, set()).add(f"qm.events.{server.server_id}")
        for broker_url, queues in self._queues.items():
            delete_queues(broker_url, queues)


WORKER_STATUS_READY = re.compile(r"worker status and health on \S+ \(port (?P<port>\d+)\)")


def worker_status(worker: Worker, timeout_s: float = 10.0):
    """The worker's qm.v1.WorkerStatus answer (children, the task each runs, pids), from the
    status endpoint it logs at start-up (worker.status_listen, port 0 by default)."""
    import grpc

    from qm._proto.qm.v1 import worker_status_pb2, worker_status_pb2_grpc

    port = worker.wait_for_line(WORKER_STATUS_READY, timeout_s).group("port")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_status_pb2_grpc.WorkerStatusStub(channel)
        return stub.GetWorkerStatus(worker_status_pb2.GetWorkerStatusRequest(), timeout=timeout_s)
