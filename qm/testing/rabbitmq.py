"""Start a private RabbitMQ node on loopback in a directory of its own.

Used by the test suite and by `scripts/run-local` so that neither touches a system
RabbitMQ: the node's data, logs, Erlang cookie (HOME) and epmd port all live under
`base_dir`, its listeners bind 127.0.0.1 on free ports. Needs Debian's
`rabbitmq-server` package (`apt-get install rabbitmq-server`); the packaged system
service is not used.

    python -m qm.testing.rabbitmq DIR    # run a node until Ctrl-C, print its URL
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import psutil

from qm.testing.process_group import GroupService

#: Where Debian's package puts the real start script (/usr/sbin's wrapper switches user).
SERVER_SCRIPT_PATHS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/lib/rabbitmq/sbin/rabbitmq-server")
#: ... and the real rabbitmqctl.
CTL_SCRIPT_PATHS = ("/usr/lib/rabbitmq/bin/rabbitmqctl", "/usr/lib/rabbitmq/sbin/rabbitmqctl")
#: How long one rabbitmqctl command may take.
CTL_TIMEOUT_S = 120.0
#: How long a node may take to accept AMQP connections after start.
START_TIMEOUT_S = 90.0


class RabbitMQNotInstalled(RuntimeError):
    """No rabbitmq-server on this machine."""


def find_server_script() -> str:
    for path in SERVER_SCRIPT_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise RabbitMQNotInstalled(
        "rabbitmq-server is not installed; on Debian/Ubuntu run "
        "`sudo apt-get install rabbitmq-server` (scripts/setup does this)"
    )


def find_ctl_script() -> str:
    for path in CTL_SCRIPT_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise RabbitMQNotInstalled(
        "rabbitmqctl is not installed; on Debian/Ubuntu run "
        "`sudo apt-get install rabbitmq-server` (scripts/setup does this)"
    )


#: Lowest port free_port hands out; it picks between here and the kernel's ephemeral range.
PICK_LOW_PORT = 10000
_handed_out: set[int] = set()
_pick = random.Random()


def _pick_range() -> range:
    """This process's ports to pick from: below the ephemeral range (which port-0 binds and
    outgoing connections draw from, so none of them takes a picked port before its service
    binds it), one slice of it per pytest-xdist worker (so two workers never pick alike)."""
    try:
        ephemeral_low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    slices = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    index = int((os.environ.get("PYTEST_XDIST_WORKER") or "gw0").removeprefix("gw") or 0) % slices
    size = (ephemeral_low - PICK_LOW_PORT) // slices
    return range(PICK_LOW_PORT + index * size, PICK_LOW_PORT + (index + 1) * size)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing is bound to now, not handed out before by this
    process, for a service started next (see _pick_range). Falls back to the kernel's
    choice where the ephemeral range leaves no room below it."""
    ports = _pick_range()
    if len(_handed_out) > len(ports) // 2:
        _handed_out.clear()
    for _ in range(1000 if len(ports) >= 1000 else 0):
        port = _pick.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class TLSListener:
    """Opt-in amqps listener: the node's PEM certificate and key, and the CA it checks
    client certificates against (`require_client_cert`: RabbitMQ's fail_if_no_peer_cert)."""

    cert: str
    key: str
    ca: str
    require_client_cert: bool = False


class LocalRabbitMQ(GroupService):
    """One RabbitMQ node; `start`, `stop` (graceful: SIGTERM), `kill` (SIGKILL) and `start` again.

    Data survives stop/kill and restart (same directory, same ports), as on a real host.
    A node of a cluster (qm.testing.rabbitmq_cluster) is given the cluster's epmd port,
    which it then leaves running when it stops, and the cluster's Erlang cookie.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        amqp_port: int = 0,
        consumer_timeout_ms: int = 1_800_000,
        epmd_port: int = 0,
        cookie: str = "",
        tls: TLSListener | None = None,
    ) -> None:
        self.base_dir = pathlib.Path(base_dir).resolve()
        self.amqp_port = amqp_port or free_port()
        self.dist_port = free_port()
        self.own_epmd = not epmd_port
        self.epmd_port = epmd_port or free_port()
        self.cookie = cookie
        self.consumer_timeout_ms = consumer_timeout_ms
        self.tls = tls
        self.amqps_port = free_port() if tls else 0
        self.process: subprocess.Popen | None = None

    @property
    def node_name(self) -> str:
        """The Erlang node name, unique per AMQP port."""
        return f"qm{self.amqp_port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def amqps_url(self) -> str:
        """The TLS listener's URL (only with `tls`); guest may log in as it is on loopback."""
        assert self.tls is not None, "LocalRabbitMQ(tls=TLSListener(...)) has the amqps listener"
        return f"amqps://guest:guest@127.0.0.1:{self.amqps_port}/%2F"

    def _environment(self) -> dict[str, str]:
        base = self.base_dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(base),
                "RABBITMQ_BASE": str(base),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_LOGS": str(base / "log" / "rabbit.log"),
                "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
                "RABBITMQ_NODENAME": self.node_name,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    def _write_config(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "log").mkdir(exist_ok=True)
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"consumer_timeout = {self.consumer_timeout_ms}\n"
            "disk_free_limit.absolute = 50MB\n" + self._tls_config()
        )
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        cookie = self.base_dir / ".erlang.cookie"  # in HOME: read by the node and by rabbitmqctl
        if self.cookie and not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)  # Erlang refuses a cookie file others can read

    def _tls_config(self) -> str:
        if self.tls is None:
            return ""
        return (
            f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {self.tls.ca}\n"
            f"ssl_options.certfile = {self.tls.cert}\n"
            f"ssl_options.keyfile = {self.tls.key}\n"
            "ssl_options.verify = verify_peer\n"
            f"ssl_options.fail_if_no_peer_cert = {str(self.tls.require_client_cert).lower()}\n"
        )

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Start the node and wait until it accepts AMQP connections; return its URL."""
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the node's process without waiting for it (see wait_ready)."""
        script = find_server_script()
        self._write_config()
        output = open(self.base_dir / "log" / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [script],
            env=self._environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        output.close()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Wait until the launched node accepts AMQP connections; return its URL."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self.process.returncode}; see {self.base_dir / 'log'}"
                )
            if _amqp_ready(self.amqp_port):
                return self.url
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(
            f"rabbitmq-server did not accept connections in {timeout_s:.0f} s; see {self.base_dir / 'log'}"
        )

    def rabbitmqctl(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        """Run `rabbitmqctl -n <this node> ARGS` as this node's environment; its output.
        RuntimeError with the output when it fails."""
        env = self._environment()
        ctl_port = str(free_port())  # the CLI is an Erlang node too: its own free dist port
        env.update({"RABBITMQ_CTL_DIST_PORT_MIN": ctl_port, "RABBITMQ_CTL_DIST_PORT_MAX": ctl_port})
        done = subprocess.run(
            [find_ctl_script(), "-n", self.node_name, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} on {self.node_name} failed "
                f"({done.returncode}): {done.stdout}{done.stderr}"
            )
        return done.stdout

    def _after_reap(self, group: int) -> None:
        if self.own_epmd:
            kill_epmd(self.epmd_port)

    def __enter__(self) -> "LocalRabbitMQ":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _amqp_ready(port: int) -> bool:
    """True once the node answers an AMQP protocol header (not just the TCP accept)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return bool(sock.recv(1))
    except OSError:
        return False


def kill_epmd(port: int) -> None:
    """End the private epmd: it daemonizes out of the node's process group."""
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "epmd":
            continue
        try:
            if process.environ().get("ERL_EPMD_PORT") == str(port):
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a private RabbitMQ node on loopback until Ctrl-C.")
    parser.add_argument("base_dir", help="directory for the node's data and logs")
    parser.add_argument("--port", type=int, default=5672, help="AMQP port on 127.0.0.1 (default 5672)")
    args = parser.parse_args(argv)
    node = LocalRabbitMQ(args.base_dir, amqp_port=args.port)
    print(f"starting RabbitMQ in {node.base_dir} ...", flush=True)
    node.start()
    print(f"RabbitMQ ready at {node.url}", flush=True)
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    while not stop and node.process is not None and node.process.poll() is None:
        time.sleep(0.5)
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
