"""The worker's own gRPC endpoint: grpc.health.v1 (NOT_SERVING while draining) and
qm.v1.WorkerStatus (children, what each runs and since when, RSS).

Secured like qm-server (docs/security.md): TLS/mTLS from worker.status_tls_*, tokens
from worker.status_tokens_file (WorkerStatus needs role `read`; health stays open); off
loopback it refuses to start without both, as qm-server does without --insecure."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qm._proto.qm.v1 import worker_status_pb2, worker_status_pb2_grpc
from qm.config import WorkerConfig, parse_host_port
from qm.errors import ConfigError
from qm.security.tls import ServerTLS
from qm.server import auth
from qm.worker.supervisor import Supervisor

log = logging.getLogger(__name__)


class WorkerStatusServicer(worker_status_pb2_grpc.WorkerStatusServicer):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def GetWorkerStatus(self, request, context):
        supervisor, pool = self.supervisor, self.supervisor.pool
        response = worker_status_pb2.GetWorkerStatusResponse(
            worker_id=supervisor.worker_id,
            draining=supervisor.draining,
            procs=pool.procs,
            prefetch=supervisor.prefetch.value,
            queues=supervisor.queues,
            tasks_finished=pool.tasks_finished,
            child_restarts=pool.restarts,
        )
        for slot in pool.slots:
            child = response.children.add(
                slot=slot.index,
                pid=slot.process.pid or 0,
                rss_bytes=slot.sample_rss() if slot.alive else 0,
                tasks_done=slot.tasks_done,
            )
            if slot.job is not None:
                child.task_id, child.type = slot.job.task_id, slot.job.type
                child.running_since.FromNanoseconds(int(slot.started_at_s * 1e9))
        return response


class StatusEndpoint:
    """A small grpc.aio server next to the supervisor, on worker.status_listen."""

    def __init__(
        self,
        supervisor: Supervisor,
        listen: str,
        tls: ServerTLS | None = None,
        authenticator: auth.Authenticator | None = None,
    ) -> None:
        self.listen = listen
        self.tls = tls
        self.health = health.aio.HealthServicer()
        interceptors = [auth.AuthInterceptor(authenticator)] if authenticator and authenticator.enabled else None
        self.server = grpc.aio.server(interceptors=interceptors)
        worker_status_pb2_grpc.add_WorkerStatusServicer_to_server(WorkerStatusServicer(supervisor), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    @classmethod
    def from_config(cls, supervisor: Supervisor, worker: WorkerConfig) -> "StatusEndpoint":
        tls = ServerTLS.load(
            worker.status_tls_cert, worker.status_tls_key, worker.status_tls_client_ca, "worker.status_"
        )
        authenticator = auth.Authenticator(worker.status_tokens_file, key="worker.status_tokens_file")
        authenticator.load()
        exposed = not auth.is_loopback(parse_host_port(worker.status_listen)[0])
        if exposed and not (tls and authenticator.enabled):
            if not worker.status_insecure:
                raise ConfigError(
                    "worker.status_listen",
                    f"{worker.status_listen} is not a loopback address: set "
                    "worker.status_tls_cert, worker.status_tls_key and "
                    "worker.status_tokens_file, listen on 127.0.0.1, or set "
                    "worker.status_insecure to accept that anyone who can "
                    "reach it may read it",
                )
            log.warning(
                "worker status endpoint on %s without TLS and tokens (worker.status_insecure)", worker.status_listen
            )
        return cls(supervisor, worker.status_listen, tls, authenticator)

    async def start(self) -> int:
        if self.tls is not None:
            self.port = self.server.add_secure_port(self.listen, self.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(self.listen)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("worker status and health on %s (port %d)", self.listen, self.port)
        return self.port

    async def draining(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        await self.server.stop(1.0)
