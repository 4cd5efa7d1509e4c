"""Start a private RabbitMQ cluster of several nodes on loopback, in a directory of its own.

Each node is a `qm.testing.rabbitmq.LocalRabbitMQ` with its own name (`qm<amqp port>@localhost`),
AMQP and distribution ports, data (mnesia) and log directories under `base_dir/node-N`;
management stays off. The nodes share one Erlang cookie and one private epmd port, so they
can find each other on this host and nothing else can join. The first node starts the
cluster; the others are joined to it with `rabbitmqctl stop_app`, `join_cluster`,
`start_app`. A stopped or killed node started again rejoins by itself (its data directory
remembers the cluster).

    python -m qm.testing.rabbitmq_cluster DIR    # run 3 nodes until Ctrl-C, print their URLs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import secrets
import signal
import sys
import time

from qm.testing.rabbitmq import START_TIMEOUT_S, LocalRabbitMQ, free_port, kill_epmd

#: Nodes in a cluster by default: the smallest that keeps a quorum with one node down.
DEFAULT_NODES = 3


class LocalRabbitMQCluster:
    """`start()` every node and join them; `stop()` them all; `nodes[i]` to stop, kill or
    start one (see LocalRabbitMQ); `urls` for `broker.urls`."""

    def __init__(
        self, base_dir: str | os.PathLike, nodes: int = DEFAULT_NODES, consumer_timeout_ms: int = 1_800_000
    ) -> None:
        self.base_dir = pathlib.Path(base_dir).resolve()
        self.epmd_port = free_port()
        cookie = secrets.token_hex(16).upper()
        self.nodes = [
            LocalRabbitMQ(
                self.base_dir / f"node-{i + 1}",
                consumer_timeout_ms=consumer_timeout_ms,
                epmd_port=self.epmd_port,
                cookie=cookie,
            )
            for i in range(nodes)
        ]

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node, the first node's first."""
        return [node.url for node in self.nodes]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> list[str]:
        """Start every node (in parallel), join the others to the first; return the URLs."""
        try:
            for node in self.nodes:
                node.launch()
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda node: node.wait_ready(timeout_s), self.nodes))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                self.join(node, first)
            self.wait_running(timeout_s)
        except BaseException:
            self.kill()
            raise
        return self.urls

    @staticmethod
    def join(node: LocalRabbitMQ, to: LocalRabbitMQ) -> None:
        """Make `node` a member of `to`'s cluster (it forgets its own, empty, state)."""
        node.rabbitmqctl("stop_app")
        node.rabbitmqctl("join_cluster", to.node_name)
        node.rabbitmqctl("start_app")

    def running_nodes(self) -> set[str]:
        """Names of the nodes the first live node sees running (rabbitmqctl cluster_status)."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                output = node.rabbitmqctl("eval", "rabbit_nodes:all_running().", timeout_s=30.0)
            except (RuntimeError, OSError):
                continue
            return {name for name in (n.node_name for n in self.nodes) if name in output}
        return set()

    def wait_running(self, timeout_s: float = START_TIMEOUT_S, count: int | None = None) -> None:
        """Wait until `count` (default: all) nodes run as one cluster and accept AMQP."""
        want = len(self.nodes) if count is None else count
        deadline = time.monotonic() + timeout_s
        while True:
            running = self.running_nodes()
            if len(running) >= want:
                for node in self.nodes:
                    if node.node_name in running:
                        node.wait_ready(max(1.0, deadline - time.monotonic()))
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"RabbitMQ cluster in {self.base_dir}: {len(running)} of {want} nodes "
                    f"running after {timeout_s:.0f} s ({sorted(running)}); see the nodes' logs"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every node gracefully (SIGKILL past the timeout), then the shared epmd."""
        for node in reversed(self.nodes):
            node.stop()
        kill_epmd(self.epmd_port)

    def kill(self) -> None:
        """SIGKILL every node and the shared epmd."""
        for node in self.nodes:
            node.kill()
        kill_epmd(self.epmd_port)

    def __enter__(self) -> "LocalRabbitMQCluster":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a private RabbitMQ cluster on loopback until Ctrl-C.")
    parser.add_argument("base_dir", help="directory for the nodes' data and logs")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help=f"nodes (default {DEFAULT_NODES})")
    args = parser.parse_args(argv)
    cluster = LocalRabbitMQCluster(args.base_dir, nodes=args.nodes)
    print(f"starting {args.nodes} RabbitMQ nodes in {cluster.base_dir} ...", flush=True)
    cluster.start()
    print("RabbitMQ cluster ready; broker.urls: " + ",".join(cluster.urls), flush=True)
    stop: list[bool] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    while not stop:
        time.sleep(0.5)
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
