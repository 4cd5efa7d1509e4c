# QueueMaster image: qm-server (the default command), qm-worker and the qm CLI, with the
# example plugin (plugins/qm-examples). docker-compose.yml runs both from this one image.
#
#   docker build -t queuemaster .
#   docker run --rm -e QM_BROKER__URL=amqp://USER:PASS@HOST:5672/%2F -p 50051:50051 queuemaster
#   docker run --rm -e QM_BROKER__URL=... -e HEALTH_TARGET=127.0.0.1:50052 queuemaster qm-worker
#
# Configuration: /etc/qm/config.yaml (deploy/qm/config.yaml, named by QM_CONFIG), overridden
# per key by QM_<SECTION>__<KEY> variables or flags; see config/config.yaml for every key.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Package metadata first, then the code: a code change does not re-resolve dependencies
# from scratch (pip's wheel cache is off, but the base layers stay).
COPY pyproject.toml setup.cfg README.md ./
COPY qm ./qm
COPY plugins/qm-examples ./plugins/qm-examples
RUN pip install --no-cache-dir . plugins/qm-examples \
 && python -c "import qm, qm_examples, grpc, grpc_health.v1, pika" \
 && rm -rf /src

# An unprivileged user; /var/lib/qm/data holds the server's SQLite store (a volume in
# compose: created here so a fresh named volume inherits the owner).
RUN groupadd --system --gid 10001 qm \
 && useradd --system --uid 10001 --gid qm --home-dir /var/lib/qm --shell /usr/sbin/nologin qm \
 && mkdir -p /var/lib/qm/data \
 && chown -R qm:qm /var/lib/qm
COPY deploy/qm/config.yaml /etc/qm/config.yaml
ENV QM_CONFIG=/etc/qm/config.yaml
WORKDIR /var/lib/qm
USER qm

# 50051 gRPC API (qm-server); 50052 worker status + health (qm-worker); 9464 / 9465
# Prometheus /metrics of qm-server / qm-worker (deploy/qm/config.yaml).
EXPOSE 50051 50052 9464 9465

# grpc.health.v1 Check of HEALTH_TARGET (default 127.0.0.1:50051, qm-server's API port).
# qm-worker serves the same health service on its status endpoint (worker.status_listen,
# 0.0.0.0:50052 in deploy/qm/config.yaml); a worker container sets
# HEALTH_TARGET=127.0.0.1:50052. The worker reports NOT_SERVING while it drains after
# SIGTERM, so a draining worker shows as unhealthy, as it should. (Deliberately no QM_
# prefix: every QM_* variable must name a setting.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
channel = grpc.insecure_channel(os.environ.get('HEALTH_TARGET', '127.0.0.1:50051')); \
status = g.HealthStub(channel).Check(h.HealthCheckRequest(service=''), timeout=4).status; \
sys.exit(0 if status == h.HealthCheckResponse.SERVING else 1)"

CMD ["qm-server"]
