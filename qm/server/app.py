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
from qm.config import (
    SQLITE_URL_PREFIX,
    Config,
    ServerConfig,
    load_config,
    parse_host_port,
    redact_url,
    scrub_secret_env,
)
from qm.errors import (
    ConfigError,
    ConsumerRefused,
    DuplicateServer,
    ServerIdentityError,
    StoreSchemaError,
    StoreUnavailable,
)
from qm.heap import freeze_start_up_objects
from qm.logs import setup_logging
from qm.metrics import ServerMetrics
from qm.metrics import serve as serve_metrics
from qm.retry import RetryPolicy
from qm.security import amqp
from qm.security.signing import Keyring
from qm.security.tls import ServerTLS
from qm.server import auth, identity, result_stream
from qm.server.admission import CORE_OPTIONS, AdmissionInterceptor
from qm.server.caps import SubmitCaps
from qm.server.quotas import QuotaInterceptor, SubmitRateLimiter
from qm.server.service import TaskService
from qm.server.servicer import TaskQueueServicer
from qm.server.store import Store
from qm.server.store_pg import ChangeListener, PgStore
from qm.server.validators import PayloadValidators
from qm.tasks import python as python_task

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
        check_caps(config)
        self.config = config
        self.tls, self.authenticator = check_exposure(config)
        python_task.configure(Keyring.from_config(config.executor), config.executor.signature_ttl_s)
        broker_urls, broker_tls = amqp.broker_urls(config.broker), amqp.ssl_context(config.broker)
        self.identity = identity.claim(config.server.data_dir, config.server.id)
        self.server_id = self.identity.server_id
        self.registry = registry or plugin_registry.discover()
        self.broker = RabbitMQBroker(
            broker_urls,
            config.broker.heartbeat_s,
            config.broker.reconnect_max_delay_s,
            connection_name="qm-server",
            quorum_initial_group_size=config.broker.quorum_initial_group_size,
            ssl_context=broker_tls,
        )
        if len(config.broker.node_urls) > 1 and config.broker.server_queue_type == "classic":
            log.warning(
                "broker.urls lists %d nodes but broker.server_queue_type is classic: this server's "
                "events, dead-letter and heartbeat queues live on one node, and while that node is "
                "down the server gets no events; set broker.server_queue_type: quorum (see "
                "docs/architecture.md, 'A RabbitMQ cluster')",
                len(config.broker.node_urls),
            )
        metrics = ServerMetrics()
        self.store = make_store(config, self.identity.store_path, self.server_id, metrics)
        self._changes: ChangeListener | None = None
        server = config.server
        default_retry = RetryPolicy(
            server.default_max_retries,
            server.default_retry_backoff_s,
            server.default_retry_backoff_max_s,
            server.default_retry_jitter,
            server.default_retry_on_timeout,
        )
        self.service = TaskService(
            self.registry,
            self.store,
            self.broker,
            max_payload_bytes=server.max_payload_bytes,
            queue_type=config.broker.queue_type,
            delivery_limit=config.broker.delivery_limit,
            server_queue_type=config.broker.server_queue_type,
            default_timeout_s=server.default_task_timeout_s,
            default_memory_limit_mb=server.default_task_memory_limit_mb,
            consumer_timeout_s=config.broker.consumer_timeout_s,
            default_retry=default_retry,
            retention_s=server.retention_s,
            metrics=metrics,
            worker_lost_after_s=server.worker_lost_after_s,
            reconcile_interval_s=server.reconcile_interval_s,
            reconcile_after_s=server.reconcile_after_s,
            max_batch_items=server.max_batch_items,
            max_delay_s=server.max_delay_s,
            caps=SubmitCaps(
                server.queues, server.max_task_timeout_s, server.max_task_memory_limit_mb, server.max_retries
            ),
            validators=PayloadValidators(server.validate_timeout_s, server.validate_threads),
            max_queue_length=config.broker.max_queue_length,
            schedule_grace_s=server.schedule_grace_s,
            max_schedules=server.max_schedules,
            max_task_cpus=server.max_task_cpus,
            bundle_max_tasks=server.bundle_max_tasks,
        )
        self.service.dead_letters.max_listed = server.max_dead_letters_listed
        self.service.dead_letters.retention_s = server.dead_letter_retention_s
        self.health = health.aio.HealthServicer()
        # Overload: calls queue in gRPC (core never sheds them) or are refused with
        # RESOURCE_EXHAUSTED beyond server.max_concurrent_rpcs (qm.server.admission).
        self.admission = AdmissionInterceptor(SERVICE_NAME, server.max_concurrent_rpcs, metrics)
        # Per-caller submit rate and stream caps (qm.server.quotas); message sizes and
        # streams per connection are gRPC core's (grpc_options).
        self.quotas = QuotaInterceptor(
            SERVICE_NAME,
            SubmitRateLimiter(server.submit_rate_per_s, server.submit_burst),
            server.max_stream_ids,
            server.max_stream_s,
            on_refused=lambda method: metrics.rate_limited.labels(method).inc(),
        )
        # Auth first: a stranger's call is refused before it counts against the admission
        # limit or its caller's submit rate.
        interceptors: list[grpc.aio.ServerInterceptor] = [self.admission, self.quotas]
        if self.authenticator.enabled:
            interceptors.insert(0, auth.AuthInterceptor(self.authenticator))
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=CORE_OPTIONS + grpc_options(server))
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
            log.info(
                "task store: PostgreSQL %s (store id %s, shared by its servers)",
                redact_url(self.store.url),
                shared_store_id,
            )
        else:
            self.store.start_checkpoints()  # most WAL checkpoint I/O off the event loop
        await self.broker.connect()
        try:
            await self.service.start_events(self.server_id, shared_store_id)
        except ConsumerRefused:
            await self._release()
            queue = f"qm.heartbeats.{self.server_id}" if shared_store_id else topology.events_queue_name(self.server_id)
            raise DuplicateServer(
                f"another live qm-server already uses server id {self.server_id} (its queue {queue} "
                "has an exclusive consumer); give this server its own --data-dir or a different "
                "server.id"
            ) from None
        if isinstance(self.store, PgStore):  # other servers' changes wake this one's streams
            self._changes = self.store.listen(self._wake_followers)
            self._changes.start()
        task_queue_pb2_grpc.add_TaskQueueServicer_to_server(
            TaskQueueServicer(self.service, result_stream.response_bytes(self.config.server.max_message_bytes)),
            self.grpc_server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        listen = self.config.server.listen
        if self.tls is not None:
            self.port = self.grpc_server.add_secure_port(listen, self.tls.credentials())
        else:
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
        log.info("qm-server %s listening on %s (port %d)%s", self.server_id, listen, self.port, self._security_note())
        return self.port

    def _security_note(self) -> str:
        tls = "off" if self.tls is None else ("mTLS" if self.tls.client_ca else "on")
        return f" with TLS {tls}, auth {'on' if self.authenticator.enabled else 'off'}"

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
        self.service.validators.close()
        await self.broker.close()
        await self.store.close()
        self.identity.release()


def check_exposure(config: Config) -> tuple[ServerTLS | None, auth.Authenticator]:
    """TLS material and authenticator from config; refuses (ConfigError) a listen address
    off loopback without both TLS and auth, unless server.insecure says so."""
    server = config.server
    tls = ServerTLS.load(server.tls_cert, server.tls_key, server.tls_client_ca, "server.")
    roles = dict(item.rpartition(":")[::2] for item in server.client_cert_roles)
    if roles and (tls is None or tls.client_ca is None):
        raise ConfigError("server.client_cert_roles", "needs mTLS: set server.tls_client_ca (and tls_cert, tls_key)")
    authenticator = auth.Authenticator(server.tokens_file, roles)
    authenticator.load()
    host = parse_host_port(server.listen)[0]
    if not auth.is_loopback(host) and not (tls and authenticator.enabled):
        missing = " and ".join(
            what
            for what, off in (
                ("TLS (--tls-cert, --tls-key)", tls is None),
                ("auth (--tokens-file)", not authenticator.enabled),
            )
            if off
        )
        if not server.insecure:
            raise ConfigError(
                "server.listen",
                f"{server.listen} is not a loopback address and {missing} is off: "
                "anyone who can reach it could submit and read tasks. Turn "
                f"{missing} on, or pass --insecure (server.insecure) to accept that",
            )
        log.warning("serving %s without %s (--insecure): anyone who can reach it may call it", server.listen, missing)
    return tls, authenticator


def grpc_options(server: ServerConfig) -> tuple[tuple[str, int], ...]:
    """gRPC core's own caps: message sizes both ways (a bigger one is refused
    RESOURCE_EXHAUSTED by gRPC itself) and concurrent streams (calls) per connection."""
    return (
        ("grpc.max_receive_message_length", server.max_message_bytes),
        ("grpc.max_send_message_length", server.max_message_bytes),
        ("grpc.max_concurrent_streams", server.max_concurrent_streams),
    )


def check_caps(config: Config) -> None:
    """Caps that must agree with each other; ConfigError naming the key otherwise."""
    server = config.server
    if server.submit_rate_per_s and server.submit_burst < server.max_batch_items:
        raise ConfigError(
            "server.submit_burst",
            (
                f"{server.submit_burst} is below server.max_batch_items ({server.max_batch_items}): a full batch "
                "could never be admitted; raise the burst or lower the batch size"
            ),
        )


def make_store(
    config: Config, default_path: str | os.PathLike, server_id: str, metrics: ServerMetrics
) -> Store | PgStore:
    """The store server.store_url names: SQLite in the data dir ("" ), a SQLite file, or a
    PostgreSQL database (connected in ServerApp.start)."""
    url = config.server.store_url
    if not url:
        return Store(default_path, observer=metrics)
    if url.startswith(SQLITE_URL_PREFIX):
        return Store(url[len(SQLITE_URL_PREFIX) :], observer=metrics)
    return PgStore(url, server_id, config.server.store_pool_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qm-server",
        description="QueueMaster API server: accepts tasks over gRPC, makes each durable in "
        "RabbitMQ before answering, and follows their state from the events queue.",
        epilog="Every flag can also be set in the config file or as QM_<SECTION>__<KEY> "
        "(e.g. QM_SERVER__LISTEN); precedence: flag > env > file > default.",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: $QM_CONFIG, else none)")
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="address to serve gRPC on; port 0 picks a free one (server.listen)"
    )
    parser.add_argument(
        "--broker-url",
        metavar="URL[,URL...]",
        help="RabbitMQ AMQP URL, or one per node of a cluster, comma-separated: the first "
        "that answers is used, the next on failover (broker.urls)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="directory of the SQLite task store and the server id; one live server per directory (server.data_dir)",
    )
    parser.add_argument(
        "--store-url",
        metavar="URL",
        help="task store: sqlite:///PATH (default: SQLite in the data dir, one per server) or "
        "postgresql://USER@HOST:PORT/DB, shared by several servers (server.store_url)",
    )
    parser.add_argument(
        "--server-id",
        metavar="ID",
        help="this server's id, naming its durable RabbitMQ queues and its store file "
        "(server.id). Default: the id in the data dir's file server-id, generated "
        "on first start as server-HOSTNAME-RANDOM. Every live server needs its own "
        "id and data dir; a second one on either is refused (exit 2)",
    )
    parser.add_argument(
        "--queues",
        metavar="NAMES",
        help="logical queues clients may submit to, comma-separated; a name or a pattern with * "
        "('*' = any valid name). Others are refused INVALID_ARGUMENT (server.queues, "
        "default: default)",
    )
    parser.add_argument(
        "--metrics-port", metavar="PORT", help="serve Prometheus /metrics on this port; 0 = off (server.metrics_port)"
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM certificate to serve TLS with (server.tls_cert)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (server.tls_key)")
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA that client certificates must be signed by: mTLS (server.tls_client_ca)",
    )
    parser.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="JSON file of hashed bearer tokens with roles (qm token create); with it, every "
        "call but health checks needs a token (server.tokens_file)",
    )
    parser.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow a listen address off loopback without TLS and auth (server.insecure)",
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (log.level)")
    parser.add_argument("--log-format", metavar="FORMAT", help="text, or json: one JSON object per line (log.format)")
    return parser.parse_args(argv)


async def serve(config: Config) -> None:
    app = ServerApp(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    log.debug("%d start-up objects frozen out of garbage collection", freeze_start_up_objects())
    await stop.wait()
    log.info("shutting down")
    await app.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(
            args.config,
            overrides={
                "server.listen": args.listen,
                "broker.urls": args.broker_url,
                "server.data_dir": args.data_dir,
                "server.id": args.server_id,
                "server.store_url": args.store_url,
                "log.level": args.log_level,
                "log.format": args.log_format,
                "server.metrics_port": args.metrics_port,
                "server.tls_cert": args.tls_cert,
                "server.tls_key": args.tls_key,
                "server.tls_client_ca": args.tls_client_ca,
                "server.tokens_file": args.tokens_file,
                "server.insecure": args.insecure,
                "server.queues": args.queues,
            },
        )
    except ConfigError as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    scrub_secret_env()  # read once into config; nothing this process starts inherits them
    os.umask(0o077)  # the data directory and everything in it: owner only (0700/0600)
    setup_logging(config.log.level, "qm-server", config.log.format)
    try:
        asyncio.run(serve(config))
    except (ServerIdentityError, ConfigError, StoreSchemaError, StoreUnavailable) as exc:
        print(f"qm-server: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
