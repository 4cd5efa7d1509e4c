"""Start a private PostgreSQL server on loopback in a directory of its own.

For the test suite and for trying the shared store by hand: `initdb` in a fresh
directory, the server listening on 127.0.0.1 on a free port (no Unix socket), trust
authentication for the `postgres` role, nothing of a system cluster used. Needs Debian's
`postgresql` package (`apt-get install postgresql`; scripts/setup --test does this), whose
binaries live in /usr/lib/postgresql/<version>/bin.

PostgreSQL refuses to run as root. Run as root (CI does), the data directory is a
directory of its own under the system temp dir, owned by the `postgres` user (the caller's
`base_dir` may sit under a root-only 0700 directory, as pytest's do), and the binaries are
started as that user through `setpriv`. `fsync` is off by default (`durable=False`): a
killed server loses nothing it committed (the kernel still holds the writes), only a
crash of the machine would; commits stay synchronous.

    python -m qm.testing.postgres DIR   # run one until Ctrl-C, print its URL
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from qm.testing.process_group import STOP_TIMEOUT_S, GroupService
from qm.testing.rabbitmq import free_port

#: Where Debian's packages put each major version's binaries (newest first wins).
BIN_DIR_PATTERN = "/usr/lib/postgresql/*/bin"
#: The OS user that runs PostgreSQL when we are root.
SERVICE_USER = "postgres"
#: How long a server may take to accept connections after start.
START_TIMEOUT_S = 60.0
#: Pause between two readiness probes.
PROBE_INTERVAL_S = 0.1


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bin_dir() -> pathlib.Path:
    """The bin directory of the newest PostgreSQL installed the Debian way."""
    candidates = [
        pathlib.Path(path) for path in glob.glob(BIN_DIR_PATTERN) if os.access(pathlib.Path(path) / "postgres", os.X_OK)
    ]
    if not candidates:
        raise PostgresNotInstalled(
            "PostgreSQL is not installed; on Debian/Ubuntu run "
            "`sudo apt-get install postgresql` (scripts/setup --test does this)"
        )
    return max(candidates, key=lambda path: _version_key(path.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class LocalPostgres(GroupService):
    """One PostgreSQL server; `start`, `stop` (fast shutdown: SIGINT cuts open sessions and
    keeps everything committed), `kill` (SIGKILL of the whole
    server) and `start` again, keeping its data and port, as a real host would; `cleanup`
    stops it and deletes its directory. `create_database(name)` gives each test its own."""

    STOP_SIGNAL = signal.SIGINT

    def __init__(self, base_dir: str | os.PathLike, port: int = 0, durable: bool = False) -> None:
        self.bin_dir = find_bin_dir()
        self.port = port or free_port()
        self.durable = durable
        self._as_root = os.geteuid() == 0
        requested = pathlib.Path(base_dir).resolve()
        if self._as_root:  # its own directory that the postgres user can reach
            self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix="qm-postgres-"))
            uid, gid = _service_ids()
            os.chown(self.base_dir, uid, gid)
            requested.mkdir(parents=True, exist_ok=True)
            (requested / "postgres-dir").write_text(f"{self.base_dir}\n")  # where to look
        else:
            self.base_dir = requested
            self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL of the `postgres` database (the server's own; tests make their own)."""
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        return f"postgresql://{SERVICE_USER}@127.0.0.1:{self.port}/{database}"

    def _command(self, name: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / name), *args]
        if self._as_root:
            return [
                "setpriv",
                f"--reuid={SERVICE_USER}",
                f"--regid={SERVICE_USER}",
                "--init-groups",
                "--reset-env",
                *argv,
            ]
        return argv

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        result = subprocess.run(
            self._command(
                "initdb",
                "-D",
                str(self.data_dir),
                "--username",
                SERVICE_USER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """initdb (first time only), start the server and wait until it accepts
        connections; return its URL."""
        self._initdb()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "logging_collector": "off",
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
        }
        args = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        log = self._open_log()
        try:
            self.process = subprocess.Popen(
                self._command("postgres", "-D", str(self.data_dir), *args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self.url
            time.sleep(PROBE_INTERVAL_S)
        self.kill()
        raise RuntimeError(f"postgres did not accept connections in {timeout_s:.0f} s:\n{self.log_tail()}")

    def _open_log(self) -> int:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return fd

    def _ready(self) -> bool:
        result = subprocess.run(
            [
                str(self.bin_dir / "pg_isready"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SERVICE_USER,
                "-d",
                "postgres",
                "-t",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def create_database(self, name: str) -> str:
        """Create a database (a fresh one per test keeps tests apart); return its URL."""
        result = subprocess.run(
            [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SERVICE_USER, name],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {result.stderr.strip()}")
        return self.database_url(name)

    def _after_reap(self, group: int) -> None:
        _wait_group_gone(group)  # the next start needs every old backend gone

    def cleanup(self) -> None:
        """Stop, then delete the server's directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()


def _service_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresNotInstalled(
            f"no '{SERVICE_USER}' user: install Debian's postgresql package (it creates the user that runs the server)"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _wait_group_gone(group: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait until no process of the group is left (backends of a killed postmaster exit
    an instant after it; a new postmaster refuses to start beside their shared memory)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(PROBE_INTERVAL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a private PostgreSQL server on loopback until Ctrl-C.")
    parser.add_argument("base_dir", help="directory for its data and log")
    parser.add_argument("--port", type=int, default=5432, help="port on 127.0.0.1 (default 5432)")
    parser.add_argument("--database", default="qm", help="database to create if absent (default qm)")
    args = parser.parse_args(argv)
    server = LocalPostgres(args.base_dir, port=args.port, durable=True)
    print(f"starting PostgreSQL in {server.base_dir} ...", flush=True)
    server.start()
    try:
        url = server.create_database(args.database)
    except RuntimeError:  # there from an earlier run
        url = server.database_url(args.database)
    print(f"PostgreSQL ready at {url}", flush=True)
    stop: list[bool] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    while not stop and server.process is not None and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
