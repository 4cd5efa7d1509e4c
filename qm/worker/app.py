"""qm-worker composition root: config → broker, pool, supervisor; signals → drain."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from qm import registry as plugin_registry
from qm.broker.rabbitmq import RabbitMQBroker
from qm.config import Config, load_config
from qm.errors import ConfigError
from qm.logs import setup_logging
from qm.worker.pool import Pool
from qm.worker.supervisor import Supervisor

log = logging.getLogger("qm.worker")

#: Deliveries prefetched per child when worker.prefetch is "auto".
AUTO_PREFETCH_PER_CHILD = 2


def effective_procs(config: Config) -> int:
    return config.worker.procs or os.cpu_count() or 1


def effective_prefetch(config: Config) -> int:
    """Channel prefetch: sized from procs in auto mode, so every child has its next task."""
    if config.worker.prefetch == "auto":
        return effective_procs(config) * AUTO_PREFETCH_PER_CHILD
    return int(config.worker.prefetch)


def worker_id(config: Config) -> str:
    return config.worker.id or f"{socket.gethostname()}:{os.getpid()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qm-worker",
        description="QueueMaster worker: one supervisor per host feeding a pool of child "
                    "processes with tasks from RabbitMQ. SIGTERM or Ctrl-C stops taking tasks, "
                    "returns the unstarted ones to the queue and lets running ones finish; a "
                    "second signal stops at once (unfinished tasks are redelivered).",
        epilog="Every flag can also be set in the config file or as QM_<SECTION>__<KEY> "
               "(e.g. QM_WORKER__PROCS); precedence: flag > env > file > default.")
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: $QM_CONFIG, else none)")
    parser.add_argument("--procs", metavar="N", help="child processes running tasks; 0 = one per CPU (worker.procs)")
    parser.add_argument("--broker-url", metavar="URL", help="RabbitMQ AMQP URL (broker.url)")
    parser.add_argument("--queues", metavar="Q1,Q2", help="logical queues to consume, comma-separated (worker.queues)")
    parser.add_argument("--prefetch", metavar="N|auto",
                        help="unacked deliveries per queue; auto = 2 per child (worker.prefetch)")
    parser.add_argument("--worker-id", metavar="ID", help="name reported in task events (worker.id; default host:pid)")
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (log.level)")
    return parser.parse_args(argv)


async def run_worker(config: Config) -> None:
    registry = plugin_registry.discover()
    for error in registry.errors:
        log.error("%s", error)
    log.info("serving task types: %s", ", ".join(sorted(registry.types)) or "none")
    modules = sorted({ep.module for ep in plugin_registry.find()})
    pool = Pool(effective_procs(config), config.worker.start_method, preload_modules=modules)
    broker = RabbitMQBroker(config.broker.url, config.broker.heartbeat_s,
                            config.broker.reconnect_max_delay_s, connection_name="qm-worker")
    supervisor = Supervisor(broker, pool, worker_id(config), list(config.worker.queues),
                            effective_prefetch(config), config.broker.queue_type)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, signals.put_nowait, signal.SIGTERM)
    # Ctrl-C signals the terminal's whole process group, and a pool child is in that group
    # until its os.setsid(). Start the pool (and with it the forkserver) with SIGINT ignored:
    # the forkserver inherits SIG_IGN and every child it forks restores it, so Ctrl-C can
    # never kill a child that is still starting (with a task already sent to it).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        await pool.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    loop.add_signal_handler(signal.SIGINT, signals.put_nowait, signal.SIGINT)
    await broker.connect()
    await supervisor.start()
    signum = await signals.get()
    log.info("%s: draining (send it again to stop at once)", signal.Signals(signum).name)
    drain = asyncio.create_task(supervisor.stop())
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: stopping now; unfinished tasks return to the queue")
        drain.cancel()
    second.cancel()
    await pool.stop()
    await broker.close()
    log.info("worker stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, overrides={
            "worker.procs": args.procs, "broker.url": args.broker_url, "worker.queues": args.queues,
            "worker.prefetch": args.prefetch, "worker.id": args.worker_id, "log.level": args.log_level})
    except ConfigError as exc:
        print(f"qm-worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, "qm-worker")
    asyncio.run(run_worker(config))
    return 0
