"""TLS and mTLS, really: qm-server and the worker status endpoint with certificates from
a test CA, RabbitMQ over amqps. Hostile cases: a plaintext client against a TLS server,
a client that trusts another CA, no client certificate or one from another CA against
mTLS. Each is refused at the handshake (UNAVAILABLE), the server keeps answering a normal
client within 1 s, and nothing is stored or enqueued."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import qm
from qm._proto.qm.v1 import task_queue_pb2, worker_status_pb2, worker_status_pb2_grpc
from qm.client.credentials import ChannelSecurity
from qm.security.tls import ClientTLS
from qm.testing.rabbitmq import LocalRabbitMQ, TLSListener
from tests.processes import WORKER_STATUS_READY, run_qm, start_server, start_worker
from tests.requirements import require_rabbitmq
from tests.security.support import (
    assert_answers_normal_client,
    assert_nothing_stored,
    attack,
    refused,
    stub,
    submit_request,
)

RESULT_TIMEOUT_S = 60.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _tls_args(certs, tokens, client_ca: bool = False) -> list[str]:
    args = ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key),
            "--tokens-file", str(tokens.path)]
    return args + (["--tls-client-ca", str(certs.ca.cert)] if client_ca else [])


def _client_tls(ca, pair=None) -> ClientTLS:
    return ClientTLS.load(str(ca.cert), str(pair.cert) if pair else None, str(pair.key) if pair else None)


def test_a_tls_server_serves_tls_clients_end_to_end_and_refuses_plaintext_and_a_wrong_ca(
        rabbitmq, launcher, certs, tokens):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, extra_args=_tls_args(certs, tokens))
    assert "with TLS on, auth on" in server.stderr
    trusted = _client_tls(certs.ca)

    def plaintext():
        with stub(server.address, tokens.submit) as plain:
            plain.SubmitTask(submit_request(queue), timeout=5)

    def trusts_another_ca():  # a client that would talk to an impostor server
        with stub(server.address, tokens.submit, _client_tls(certs.other_ca)) as misled:
            misled.SubmitTask(submit_request(queue), timeout=5)

    for hostile in (plaintext, trusts_another_ca):
        with attack(hostile):
            assert_answers_normal_client(server.address, tokens.read, trusted)
        assert refused(hostile).code() is UNAVAILABLE
    assert_nothing_stored(server, rabbitmq.url, queue)

    launcher.worker(rabbitmq.url, procs=1, queues=queue)
    with qm.Client(server.address, tls_ca=str(certs.ca.cert), token=tokens.submit) as client:
        task_id = client.submit("math", "6 * 7", queue=queue)
        assert client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "42"
    types = run_qm("--tls-ca", str(certs.ca.cert), "types", server=server.address,
                   env={"QM_CLIENT__TOKEN": tokens.read})
    assert types.returncode == 0 and "math" in types.stdout, types
    assert_answers_normal_client(server.address, tokens.read, trusted)


def test_mtls_refuses_clients_without_a_certificate_of_its_ca_and_maps_common_names_to_roles(
        rabbitmq, launcher, certs, tokens):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, extra_args=_tls_args(certs, tokens, client_ca=True),
                             env={"QM_SERVER__CLIENT_CERT_ROLES": "ci-runner:submit"})
    assert "with TLS mTLS" in server.stderr
    member = _client_tls(certs.ca, certs.client)

    def without_certificate():
        with stub(server.address, tokens.admin, _client_tls(certs.ca)) as anonymous:
            anonymous.SubmitTask(submit_request(queue), timeout=5)

    def certificate_of_another_ca():
        with stub(server.address, tokens.admin, _client_tls(certs.ca, certs.stranger)) as stranger:
            stranger.SubmitTask(submit_request(queue), timeout=5)

    for hostile in (without_certificate, certificate_of_another_ca):
        with attack(hostile):
            assert_answers_normal_client(server.address, tokens.read, member)
        assert refused(hostile).code() is UNAVAILABLE
    assert_nothing_stored(server, rabbitmq.url, queue)

    # The certificate's common name "ci-runner" has role submit without any token ...
    with stub(server.address, "", member) as by_certificate:
        assert by_certificate.SubmitTask(submit_request(queue), timeout=30).task_id
        denied = refused(lambda: by_certificate.ListDeadLetters(task_queue_pb2.ListDeadLettersRequest(), timeout=10))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED and "CN=ci-runner" in denied.details()
    with stub(server.address, "", _client_tls(certs.ca, certs.nobody)) as unlisted:
        no_role = refused(lambda: unlisted.SubmitTask(submit_request(queue), timeout=10))
    assert no_role.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "client certificate CN=nobody has no role" in no_role.details()
    # ... and a token, when sent, decides the role.
    with qm.Client(server.address, tls_ca=str(certs.ca.cert), tls_cert=str(certs.client.cert),
                   tls_key=str(certs.client.key), token=tokens.admin) as admin:
        assert admin.dead_letters()[1] == 0


def test_a_missing_unreadable_or_mismatched_certificate_stops_the_start_naming_the_key(
        rabbitmq, launcher, certs, tmp_path):
    missing = launcher.server(rabbitmq.url, wait_ready=False,
                              extra_args=["--tls-cert", str(certs.server.cert), "--tls-key", str(tmp_path / "nope")])
    assert missing.wait(60) == 2
    assert "server.tls_key" in missing.stderr and "not found" in missing.stderr
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    garbage = launcher.server(rabbitmq.url, wait_ready=False,
                              extra_args=["--tls-cert", str(not_pem), "--tls-key", str(certs.server.key)])
    assert garbage.wait(60) == 2 and "server.tls_cert" in garbage.stderr and "PEM" in garbage.stderr
    mismatched = launcher.server(rabbitmq.url, wait_ready=False,
                                 extra_args=["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.client.key)])
    assert mismatched.wait(60) == 2 and "server.tls_key" in mismatched.stderr and "pair" in mismatched.stderr


def test_the_worker_status_endpoint_takes_tls_and_tokens_and_keeps_health_open(rabbitmq, launcher, certs, tokens):
    queue = launcher.queue(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=1, queues=queue, env={
        "QM_WORKER__STATUS_TLS_CERT": str(certs.server.cert), "QM_WORKER__STATUS_TLS_KEY": str(certs.server.key),
        "QM_WORKER__STATUS_TOKENS_FILE": str(tokens.path)})
    port = worker.wait_for_line(WORKER_STATUS_READY, 30).group("port")
    address = f"127.0.0.1:{port}"
    request = worker_status_pb2.GetWorkerStatusRequest()

    def status(token: str, tls: ClientTLS | None):
        with ChannelSecurity(tls, token).channel(address) as channel:
            return worker_status_pb2_grpc.WorkerStatusStub(channel).GetWorkerStatus(request, timeout=10)

    assert refused(lambda: status(tokens.read, None)).code() is UNAVAILABLE  # plaintext
    assert refused(lambda: status("", _client_tls(certs.ca))).code() is grpc.StatusCode.UNAUTHENTICATED
    assert status(tokens.read, _client_tls(certs.ca)).worker_id == worker.worker_id
    with ChannelSecurity(_client_tls(certs.ca)).channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def tls_rabbitmq(tmp_path_factory, certs):
    """A private RabbitMQ node with an amqps listener that requires client certificates."""
    require_rabbitmq()
    node = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq-tls"),
                         tls=TLSListener(str(certs.server.cert), str(certs.server.key), str(certs.ca.cert),
                                         require_client_cert=True))
    node.start()
    yield node
    node.kill()


def test_server_and_worker_reach_rabbitmq_over_amqps_with_ca_and_client_certificate_keys(
        tls_rabbitmq, certs, tmp_path):
    """amqps:// with broker.tls_ca/tls_cert/tls_key (config keys, not URL query strings) and
    the password from broker.password_file: a task goes through server, RabbitMQ and worker.
    (Started without the launcher: its teardown cleans queues over plain AMQP; this node
    is private and killed whole.)"""
    password_file = tmp_path / "rabbitmq-password"
    password_file.write_text("guest\n")
    url = tls_rabbitmq.amqps_url.replace("guest:guest@", "guest:not-the-password@")
    env = {"QM_BROKER__TLS_CA": str(certs.ca.cert), "QM_BROKER__TLS_CERT": str(certs.client.cert),
           "QM_BROKER__TLS_KEY": str(certs.client.key), "QM_BROKER__PASSWORD_FILE": str(password_file)}
    started = []
    try:
        server = start_server(url, tmp_path, env=env)
        started.append(server)
        started.insert(0, start_worker(url, procs=1, queues="default", env=env))
        with qm.Client(server.address) as client:
            task_id = client.submit("math", "2 ** 10")
            assert client.result(task_id, timeout_s=RESULT_TIMEOUT_S) == "1024"
    finally:
        for process in started:
            process.stop()
