"""qm-worker composition root: config → broker, pool, supervisor; signals → drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from qm import limits as task_limits
from qm import registry as plugin_registry
from qm.broker.rabbitmq import RabbitMQBroker
from qm.config import Config, load_config, parse_host_port, scrub_secret_env
from qm.errors import ConfigError
from qm.logs import setup_logging
from qm.metrics import serve as serve_metrics
from qm.security import amqp
from qm.security.signing import Keyring
from qm.worker import sched_policy
from qm.worker.cpu_slots import pinning_cores
from qm.worker.pool import Pool
from qm.worker.prefetch import AutoPrefetch, FixedPrefetch
from qm.worker.status import StatusEndpoint
from qm.worker.supervisor import Supervisor

log = logging.getLogger("qm.worker")

#: How often the per-child RSS gauge is refreshed when metrics are on.
RSS_METRIC_INTERVAL_S = 2.0
#: How often a worker waiting for RabbitMQ at start-up says so.
BROKER_WAIT_LOG_S = 5.0


def effective_procs(config: Config) -> int:
    return config.worker.procs or os.cpu_count() or 1


def prefetch_policy(config: Config) -> AutoPrefetch | FixedPrefetch:
    """`auto`: sized from procs and adapted to observed task time; else a fixed number."""
    prefetch = config.worker.prefetch
    if isinstance(prefetch, int):
        return FixedPrefetch(prefetch)
    return AutoPrefetch(effective_procs(config))


def worker_id(config: Config) -> str:
    return config.worker.id or f"{socket.gethostname()}:{os.getpid()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qm-worker",
        description="QueueMaster worker: one supervisor per host feeding a pool of child "
        "processes with tasks from RabbitMQ, enforcing each task's time and memory "
        "limits by killing its process group. SIGTERM or Ctrl-C drains: stop taking "
        "tasks, return the unstarted ones to the queue, let running ones finish up to "
        "--drain-timeout; a second signal returns everything at once and exits.",
        epilog="Every flag can also be set in the config file or as QM_<SECTION>__<KEY> "
        "(e.g. QM_WORKER__PROCS); precedence: flag > env > file > default.",
    )
    add = parser.add_argument
    add("--config", metavar="PATH", help="YAML config file (default: $QM_CONFIG, else none)")
    add(
        "--procs",
        metavar="N",
        help="child processes running tasks, and CPU slots: a task with cpus=K holds K "
        "while it runs; 0 = one per CPU (worker.procs)",
    )
    add(
        "--pin-cpus",
        metavar="true|false",
        help="pin each task to the CPUs of its slots when --procs is at most the CPUs "
        "available; otherwise tasks only get QM_TASK_CPUS (worker.pin_cpus)",
    )
    add(
        "--broker-url",
        metavar="URL[,URL...]",
        help="RabbitMQ AMQP URL, or one per node of a cluster, "
        "comma-separated: the first that answers is used, the "
        "next on failover (broker.urls)",
    )
    add("--queues", metavar="Q1,Q2", help="logical queues to consume, comma-separated (worker.queues)")
    add(
        "--prefetch",
        metavar="N|auto",
        help="unacked deliveries per queue; auto = 1 per child for long "
        "tasks, up to 16 per child for tasks of a few ms (worker.prefetch)",
    )
    add("--task-timeout", metavar="S", help="cap on any task's time limit, seconds; 0 = no cap (worker.task_timeout_s)")
    add(
        "--task-memory-limit",
        metavar="MB",
        help="cap on any task's memory limit, MiB; 0 = no cap (worker.task_memory_limit_mb)",
    )
    add(
        "--max-tasks-per-child",
        metavar="N",
        help="restart a child after N tasks; 0 = never (worker.max_tasks_per_child)",
    )
    add("--drain-timeout", metavar="S", help="on SIGTERM, how long running tasks may finish (worker.drain_timeout_s)")
    add(
        "--status-listen",
        metavar="HOST:PORT",
        help="gRPC health + status endpoint; port 0 picks one; '' disables (worker.status_listen)",
    )
    add("--metrics-port", metavar="PORT", help="serve Prometheus /metrics on this port; 0 = off (worker.metrics_port)")
    add("--worker-id", metavar="ID", help="name reported in task events (worker.id; default host:pid)")
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (log.level)")
    add("--log-format", metavar="FORMAT", help="text, or json: one JSON object per line (log.format)")
    return parser.parse_args(argv)


def build(config: Config, registry: plugin_registry.Registry) -> tuple[Pool, RabbitMQBroker, Supervisor]:
    """The worker's parts, wired from config (nothing started)."""
    # Preload only plugins that loaded cleanly here: the forkserver dies on any import error
    # other than ImportError, and one broken plugin must not stop the worker.
    modules = sorted({ep.module for ep in plugin_registry.find() if ep.name in registry.types})
    procs = effective_procs(config)
    pool = Pool(
        procs,
        config.worker.start_method,
        preload_modules=modules,
        memory_check_interval_s=config.worker.memory_check_interval_s,
        max_tasks_per_child=config.worker.max_tasks_per_child,
        max_idle_rss_mb=config.worker.max_child_idle_rss_mb,
        address_space_limit=config.worker.address_space_limit,
        executor_keys=(Keyring.from_config(config.executor), config.executor.signature_ttl_s),
        cores=pinning_cores(procs, config.worker.pin_cpus),
    )
    broker = RabbitMQBroker(
        amqp.broker_urls(config.broker),
        config.broker.heartbeat_s,
        config.broker.reconnect_max_delay_s,
        connection_name="qm-worker",
        quorum_initial_group_size=config.broker.quorum_initial_group_size,
        ssl_context=amqp.ssl_context(config.broker),
    )
    caps = task_limits.Limits(config.worker.task_timeout_s, config.worker.task_memory_limit_mb)
    supervisor = Supervisor(
        broker,
        pool,
        worker_id(config),
        list(config.worker.queues),
        prefetch_policy(config),
        config.broker.queue_type,
        caps=caps,
        delivery_limit=config.broker.delivery_limit,
        max_queue_length=config.broker.max_queue_length,
        max_result_bytes=config.worker.max_result_bytes,
        pack_events=config.worker.pack_events,
        consumer_timeout_s=config.broker.consumer_timeout_s,
        running_event_delay_s=config.worker.running_event_delay_s,
    )
    pool.on_idle_gap = supervisor.metrics.child_idle_gap_seconds.observe
    supervisor.metrics.watch(
        busy=lambda: supervisor.busy,
        idle=lambda: max(0, pool.procs - supervisor.busy),
        busy_cpus=lambda: pool.busy_cpus,
        cpus=lambda: pool.procs,
        restarts=lambda: pool.restarts,
        prefetch=lambda: supervisor.prefetch.value,
        unacked=lambda: supervisor.unacked,
        reconnects=lambda: max(0, broker.connections - 1),
    )
    return pool, broker, supervisor


async def sample_child_rss(supervisor: Supervisor, interval_s: float = RSS_METRIC_INTERVAL_S) -> None:
    """Keep the per-child RSS gauge current (sampled on the loop's thread)."""
    while True:
        for slot in supervisor.pool.slots:
            supervisor.metrics.child_rss_bytes.labels(str(slot.index)).set(slot.sample_rss() if slot.alive else 0)
        await asyncio.sleep(interval_s)


async def run_worker(config: Config) -> None:
    registry = plugin_registry.discover()
    for error in registry.errors:
        log.error("%s", error)
    log.info("serving task types: %s", ", ".join(sorted(registry.types)) or "none")
    pool, broker, supervisor = build(config, registry)
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, signals.put_nowait, signal.SIGTERM)
    if config.worker.sched_batch:  # before the pool starts: its children take back the original
        pool.child_sched_policy = sched_policy.yield_to_tasks()
    # Ctrl-C signals the terminal's whole process group. Start the pool (and with it the
    # forkserver) with SIGINT ignored: the forkserver inherits SIG_IGN, so a Ctrl-C during
    # start-up cannot kill it or a child that has not yet left the group.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        await pool.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    loop.add_signal_handler(signal.SIGINT, signals.put_nowait, signal.SIGINT)
    status = StatusEndpoint.from_config(supervisor, config.worker) if config.worker.status_listen else None
    background: list[asyncio.Task] = []
    try:  # whatever happens from here, the pool stops (its children ignore SIGTERM)
        if status:
            await status.start()
        if config.worker.metrics_port:
            host = parse_host_port(config.worker.status_listen)[0] if config.worker.status_listen else "127.0.0.1"
            port = serve_metrics(supervisor.metrics.registry, config.worker.metrics_port, host)
            log.info("metrics on http://%s:%d/metrics", host, port)
            background.append(asyncio.create_task(sample_child_rss(supervisor)))
        await broker.connect()
        while not await broker.wait_connected(BROKER_WAIT_LOG_S):
            if not signals.empty():
                return
            log.warning("%s; waiting for it before taking tasks", broker.unavailable())
        await supervisor.start()
        types = sorted(registry.types)
        background.append(asyncio.create_task(supervisor.send_heartbeats(config.worker.heartbeat_interval_s, types)))
        signum = await signals.get()
        await _drain(supervisor, status, signals, signum, config.worker.drain_timeout_s)
        for task in background:
            task.cancel()
        await supervisor.send_heartbeat(types, stopped=True)
    finally:
        for task in background:
            task.cancel()
        await pool.stop()
        await broker.close()
        if status:
            await status.stop()
    log.info("worker stopped")


async def _drain(
    supervisor: Supervisor,
    status: StatusEndpoint | None,
    signals: asyncio.Queue[int],
    signum: int,
    drain_timeout_s: float,
) -> None:
    """First signal: drain up to the timeout; a second one: return everything now."""
    log.info(
        "%s: draining for up to %g s (send it again to stop at once)", signal.Signals(signum).name, drain_timeout_s
    )
    if status:
        await status.draining()
    drain = asyncio.create_task(supervisor.stop(drain_timeout_s))
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: stopping now; unfinished tasks return to the queue")
        drain.cancel()
        await supervisor.abort()
    second.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(
            args.config,
            overrides={
                "worker.procs": args.procs,
                "worker.pin_cpus": args.pin_cpus,
                "broker.urls": args.broker_url,
                "worker.queues": args.queues,
                "worker.prefetch": args.prefetch,
                "worker.task_timeout_s": args.task_timeout,
                "worker.task_memory_limit_mb": args.task_memory_limit,
                "worker.max_tasks_per_child": args.max_tasks_per_child,
                "worker.drain_timeout_s": args.drain_timeout,
                "worker.status_listen": args.status_listen,
                "worker.id": args.worker_id,
                "worker.metrics_port": args.metrics_port,
                "log.level": args.log_level,
                "log.format": args.log_format,
            },
        )
    except ConfigError as exc:
        print(f"qm-worker: {exc}", file=sys.stderr)
        return 2
    scrub_secret_env()  # read once into config; the children (task code) never inherit them
    setup_logging(config.log.level, "qm-worker", config.log.format)
    try:
        asyncio.run(run_worker(config))
    except ConfigError as exc:  # found at start-up, e.g. a work queue of another type in RabbitMQ
        log.error("%s", exc)
        return 2
    return 0
