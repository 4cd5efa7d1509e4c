"""qm-server composition root: config → registry, broker, store → gRPC server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qm import registry as plugin_registry
from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.broker import topology
from qm.broker.rabbitmq import RabbitMQBroker
from qm.config import SQLITE_URL_PREFIX, Config, export_executor_secret, load_config, parse_host_port, redact_url
from qm.errors import (
    ConfigError,
    ConsumerRefused,
    DuplicateServer,
    ServerIdentityError,
    StoreSchemaError,
    StoreUnavailable,
)
from qm.logs import setup_logging
from qm.metrics import ServerMetrics
from qm.metrics import serve as serve_metrics
from qm.retry import RetryPolicy
from qm.server import identity
from qm.server.admission import CORE_OPTIONS, AdmissionInterceptor
from qm.server.service import TaskService
from qm.server.servicer import TaskQueueServicer
from qm.server.store import Store
from qm.server.store_pg import ChangeListener, PgStore

log = logging.getLogger("qm.server")

SERVICE_NAME = task_queue_pb2.DESCRIPTOR.services_by_name["TaskQueue"].full_name


#: Exit code of a start refused: a bad setting, or another live server on this data dir or id.
EXIT_REFUSED = 2


class ServerApp:
    """A running qm-server: `await start()`, `port`, `await stop()`.

    Constructing it claims the data directory and settles the server id
    (qm.server.identity); `start()` is refused with DuplicateServer if another live server
    consumes this id's events queue (an exclusive consumer, so RabbitMQ tells us).
    """

    def __init__(self, config: Config, registry: plugin_registry.Registry | None = None) -> None:
        self.config = config
        self.identity = identity.claim(config.server.data_dir, config.server.id)
        self.server_id = self.identity.server_id
        self.registry = registry or plugin_registry.discover()
        self.broker = RabbitMQBroker(config.broker.node_urls, config.broker.heartbeat_s,
                                     config.broker.reconnect_max_delay_s, connection_name="qm-server",
                                     quorum_initial_group_size=config.broker.quorum_initial_group_size)
        if len(config.broker.node_urls) > 1 and config.broker.server_queue_type == "classic":
            log.warning("broker.urls lists %d nodes but broker.server_queue_type is classic: this server's "
                        "events, dead-letter and heartbeat queues live on one node, and while that node is "
                        "down the server gets no events; set broker.server_queue_type: quorum (see "
                        "docs/architecture.md, 'A RabbitMQ cluster')", len(config.broker.node_urls))
        metrics = ServerMetrics()
        self.store = make_store(config, self.identity.store_path, self.server_id, metrics)
        self._changes: ChangeListener | None = None
        server = config.server
        default_retry = RetryPolicy(server.default_max_retries, server.default_retry_backoff_s,
                                    server.default_retry_backoff_max_s, server.default_retry_jitter,
                                    server.default_retry_on_timeout)
        self.service = TaskService(self.registry, self.store, self.broker,
                                   max_payload_bytes=server.max_payload_bytes,
                                   queue_type=config.broker.queue_type,
                                   delivery_limit=config.broker.delivery_limit,
                                   server_queue_type=config.broker.server_queue_type,
                                   default_timeout_s=server.default_task_timeout_s,
                                   default_memory_limit_mb=server.default_task_memory_limit_mb,
                                   consumer_timeout_s=config.broker.consumer_timeout_s,
                                   default_retry=default_retry, retention_s=server.retention_s,
                                   metrics=metrics, worker_lost_after_s=server.worker_lost_after_s,
                                   reconcile_interval_s=server.reconcile_interval_s,
                                   reconcile_after_s=server.reconcile_after_s,
                                   max_batch_items=server.max_batch_items)
        self.health = health.aio.HealthServicer()
        # Overload: calls queue in gRPC (core never sheds them) or are refused with
        # RESOURCE_EXHAUSTED beyond server.max_concurrent_rpcs (qm.server.admission).
        self.admission = AdmissionInterceptor(SERVICE_NAME, server.max_concurrent_rpcs, metrics)
        self.grpc_server = grpc.aio.server(interceptors=[self.admission], options=CORE_OPTIONS)
        self.port = 0

    async def start(self) -> int:
        """Connect, start consuming events, bind and serve; return the bound port."""
        for error in self.registry.errors:
            log.error("%s", error)
        log.info("serving task types: %s", ", ".join(sorted(self.registry.types)) or "none")
        shared_store_id = None
        if isinstance(self.store, PgStore):
            try:
                await self.store.connect()  # and migrate its schema
            except (StoreUnavailable, StoreSchemaError):
                self.identity.release()
                raise
            shared_store_id = self.store.store_id
            log.info("task store: PostgreSQL %s (store id %s, shared by its servers)",
                     redact_url(self.store.url), shared_store_id)
        else:
            self.store.start_checkpoints()  # most WAL checkpoint I/O off the event loop
        await self.broker.connect()
        try:
            await self.service.start_events(self.server_id, shared_store_id)
        except ConsumerRefused:
            await self._release()
            queue = (f"qm.heartbeats.{self.server_id}" if shared_store_id
                     else topology.events_queue_name(self.server_id))
            raise DuplicateServer(
                f"another live qm-server already uses server id {self.server_id} (its queue {queue} "
                "has an exclusive consumer); give this server its own --data-dir or a different "
                "server.id") from None
        if isinstance(self.store, PgStore):  # other servers' changes wake this one's streams
            self._changes = self.store.listen(self._wake_followers)
            self._changes.start()
        task_queue_pb2_grpc.add_TaskQueueServicer_to_server(TaskQueueServicer(self.service), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        listen = self.config.server.listen
        self.port = self.grpc_server.add_insecure_port(listen)
        if self.port == 0:
            raise ConfigError("server.listen", f"cannot bind {listen}")
        await self.grpc_server.start()
        if self.config.server.metrics_port:
            host = parse_host_port(listen)[0]
            metrics_port = serve_metrics(self.service.metrics.registry, self.config.server.metrics_port, host)
            log.info("metrics on http://%s:%d/metrics", host, metrics_port)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("qm-server %s listening on %s (port %d)", self.server_id, listen, self.port)
        return self.port

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.config.server.grace_s)
        await self._release()
        log.info("qm-server stopped")

    async def _wake_followers(self, task_ids: list[str] | None) -> None:
        """Another server of the shared store changed these tasks (None: maybe any): send
        their records to the streams here that follow them."""
        assert isinstance(self.store, PgStore)
        followed = self.service.hub.following(task_ids)
        if followed:
            for record in await self.store.get_many(followed):
                self.service.hub.publish(record)

    async def _release(self) -> None:
        """Stop consuming, disconnect, close the store, then let go of the data directory."""
        if self._changes is not None:
            await self._changes.stop()
        await self.service.stop_events()
        await self.broker.close()
        await self.store.close()
        self.identity.release()


def make_store(config: Config, default_path: str | os.PathLike, server_id: str,
               metrics: ServerMetrics) -> Store | PgStore:
    """The store server.store_url names: SQLite in the data dir ("" ), a SQLite file, or a
    PostgreSQL database (connected in ServerApp.start)."""
    url = config.server.store_url
    if not url:
        return Store(default_path, observer=metrics)
    if url.startswith(SQLITE_URL_PREFIX):
        return Store(url[len(SQLITE_URL_PREFIX):], observer=metrics)
    return PgStore(url, server_id, config.server.store_pool_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qm-server",
        description="QueueMaster API server: accepts tasks over gRPC, makes each durable in "
                    "RabbitMQ before answering, and follows their state from the events queue.",
        epilog="Every flag can also be set in the config file or as QM_<SECTION>__<KEY> "
               "(e.g. QM_SERVER__LISTEN); precedence: flag > env > file > default.")
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: $QM_CONFIG, else none)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="address to serve gRPC on; port 0 picks a free one (server.listen)")
    parser.add_argument("--broker-url", metavar="URL[,URL...]",
                        help="RabbitMQ AMQP URL, or one per node of a cluster, comma-separated: the first "
                             "that answers is used, the next on failover (broker.urls)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="directory of the SQLite task store and the server id; one live server per "
                             "directory (server.data_dir)")
    parser.add_argument("--store-url", metavar="URL",
                        help="task store: sqlite:///PATH (default: SQLite in the data dir, one per server) or "
                             "postgresql://USER@HOST:PORT/DB, shared by several servers (server.store_url)")
    parser.add_argument("--server-id", metavar="ID",
                        help="this server's id, naming its durable RabbitMQ queues and its store file "
                             "(server.id). Default: the id in the data dir's file server-id, generated "
                             "on first start as server-HOSTNAME-RANDOM. Every live server needs its own "
                             "id and data dir; a second one on either is refused (exit 2)")
    parser.add_argument("--metrics-port", metavar="PORT",
                        help="serve Prometheus /metrics on this port; 0 = off (server.metrics_port)")
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (log.level)")
    parser.add_argument("--log-format", metavar="FORMAT",
                        help="text, or json: one JSON object per line (log.format)")
    return parser.parse_args(argv)


async def serve(config: Config) -> None:
    app = ServerApp(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    await stop.wait()
    log.info("shutting down")
    await app.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, overrides={
            "server.listen": args.listen, "broker.urls": args.broker_url,
            "server.data_dir": args.data_dir, "server.id": args.server_id, "server.store_url": args.store_url,
            "log.level": args.log_level,
            "log.format": args.log_format,
            "server.metrics_port": args.metrics_port})
    except ConfigError as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    export_executor_secret(config)
    setup_logging(config.log.level, "qm-server", config.log.format)
    try:
        asyncio.run(serve(config))
    except (ServerIdentityError, ConfigError, StoreSchemaError, StoreUnavailable) as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
