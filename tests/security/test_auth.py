"""Hostile clients against a qm-server with a tokens file: no token, a wrong, expired or
revoked one, a role without the right. Each gets its documented status code
(docs/security.md), the server keeps answering a normal client within 1 s while and after
it is hit, and nothing is stored or enqueued for a refused request."""
from __future__ import annotations

import asyncio
import datetime
import json
import secrets

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import qm
import qm.aio
from qm._proto.qm.v1 import task_queue_pb2
from qm.client.common import error_reason
from qm.client.credentials import ChannelSecurity
from qm.security.tokens import TokenFile
from tests.processes import run_qm, wait_until
from tests.security.support import (
    assert_answers_normal_client,
    assert_nothing_stored,
    attack,
    refused,
    stored_tasks,
    stub,
    submit_request,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
#: Bound on a token with a 1 s lifetime having expired.
EXPIRY_BOUND_S = 30.0
#: Bound on a task's result through a loaded machine's worker.
RESULT_TIMEOUT_S = 120.0


@pytest.fixture
def guarded(rabbitmq, launcher, tokens):
    """A server with a tokens file, and a logical queue no worker consumes (so a message
    that got through would stay there to be seen)."""
    server = launcher.server(rabbitmq.url, extra_args=["--tokens-file", str(tokens.path)])
    return server, launcher.queue(rabbitmq.url)


def _submit_with_header(address: str, header: str, queue: str):
    with grpc.insecure_channel(address) as channel:
        stub_ = channel.unary_unary("/qm.v1.TaskQueue/SubmitTask",
                                    request_serializer=task_queue_pb2.SubmitTaskRequest.SerializeToString,
                                    response_deserializer=task_queue_pb2.SubmitTaskResponse.FromString)
        return stub_(submit_request(queue), metadata=(("authorization", header),), timeout=10)


def test_missing_wrong_malformed_expired_and_revoked_tokens_are_unauthenticated(guarded, rabbitmq, tokens):
    server, queue = guarded
    token_file = TokenFile(str(tokens.path))
    expiring = token_file.create("admin", "short-lived", ttl_s=1.0)
    revoked = token_file.create("admin", "leaked")
    revoke = run_qm("token", "revoke", "leaked", "--tokens-file", str(tokens.path))
    assert revoke.returncode == 0, revoke.stderr
    expires_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    wait_until(lambda: datetime.datetime.now(datetime.timezone.utc) > expires_at, EXPIRY_BOUND_S,
               message="the short-lived token's expiry")

    cases = {
        "no token": ("", "needs credentials"),
        "wrong token": ("qm_" + secrets.token_urlsafe(32), "not known to this server"),
        "expired token": (expiring, "expired"),
        "revoked token": (revoked, "revoked"),
    }
    for case, (token, words) in cases.items():
        def hostile(token=token):
            with stub(server.address, token) as hostile_stub:
                hostile_stub.SubmitTask(submit_request(queue), timeout=10)

        with attack(hostile):
            assert_answers_normal_client(server.address, tokens.read)
        error = refused(hostile)
        assert error.code() is UNAUTHENTICATED, (case, error)
        assert words in error.details(), (case, error.details())
        assert error_reason(error) == "UNAUTHENTICATED"  # ErrorInfo, for clients that decide by reason

    malformed = refused(lambda: _submit_with_header(server.address, "Basic dXNlcjpwYXNz", queue))
    assert malformed.code() is UNAUTHENTICATED and "Bearer" in malformed.details()

    assert_nothing_stored(server, rabbitmq.url, queue)
    assert_answers_normal_client(server.address, tokens.read)


def test_a_role_without_the_right_is_permission_denied_and_the_right_role_is_served(guarded, rabbitmq, tokens):
    server, queue = guarded
    with stub(server.address, tokens.read) as reader, stub(server.address, tokens.submit) as submitter:
        denied = {
            "read submits": lambda: reader.SubmitTask(submit_request(queue), timeout=10),
            "read cancels": lambda: reader.CancelTask(task_queue_pb2.CancelTaskRequest(task_id="x"), timeout=10),
            "read submits a group": lambda: reader.SubmitGroup(
                task_queue_pb2.SubmitGroupRequest(items=[submit_request(queue)]), timeout=10),
            "submit lists dead letters": lambda: submitter.ListDeadLetters(
                task_queue_pb2.ListDeadLettersRequest(), timeout=10),
            "submit purges dead letters": lambda: submitter.PurgeDeadLetters(
                task_queue_pb2.PurgeDeadLettersRequest(), timeout=10),
            "read adds a schedule": lambda: reader.AddSchedule(task_queue_pb2.AddScheduleRequest(
                schedule_id="by-reader", every_s=1, task=submit_request(queue)), timeout=10),
            "read removes a schedule": lambda: reader.RemoveSchedule(
                task_queue_pb2.RemoveScheduleRequest(schedule_id="by-submitter"), timeout=10),
        }
        for case, hostile in denied.items():
            with attack(hostile):
                assert_answers_normal_client(server.address, tokens.read)
            error = refused(hostile)
            assert error.code() is PERMISSION_DENIED and error_reason(error) == "PERMISSION_DENIED", (case, error)
            assert "needs role" in error.details(), (case, error.details())
        assert "SubmitTask needs role 'submit'; reader has role 'read'" in refused(denied["read submits"]).details()
        assert_nothing_stored(server, rabbitmq.url, queue)

        # The roles that do have the right are served.
        listed = reader.ListSchedules(task_queue_pb2.ListSchedulesRequest(), timeout=10)
        assert list(listed.schedules) == []  # the reader's add never happened
        task_id = submitter.SubmitTask(submit_request(queue), timeout=30).task_id
        status = reader.GetTaskStatus(task_queue_pb2.GetTaskStatusRequest(task_id=task_id), timeout=10)
        assert status.status.task_id == task_id
    with stub(server.address, tokens.admin) as admin:
        admin.ListDeadLetters(task_queue_pb2.ListDeadLettersRequest(), timeout=10)
    assert stored_tasks(server.data_dir) == 1


def test_health_is_open_and_reflection_follows_auth(guarded, tokens):
    server, _queue = guarded
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="qm.v1.TaskQueue"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    def list_services(token: str) -> list[str]:
        with ChannelSecurity(None, token).channel(server.address) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            [response] = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
            return [service.name for service in response.list_services_response.service]

    error = refused(lambda: list_services(""))
    assert error.code() is UNAUTHENTICATED
    assert "qm.v1.TaskQueue" in list_services(tokens.read)


def test_qm_token_commands_and_the_cli_exit_code_of_a_refusal(guarded, tokens):
    server, _queue = guarded
    created = run_qm("token", "create", "--role", "read", "--name", "dashboard", "--tokens-file", str(tokens.path))
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("qm_") and token not in tokens.path.read_text(), "the token must be stored hashed"

    listed = run_qm("token", "list", "--json", "--tokens-file", str(tokens.path))
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"name": "dashboard", "role": "read"}.items() <= rows[-1].items() and "sha256" not in rows[-1]

    without = run_qm("types", server=server.address)
    assert without.returncode == 4, without
    assert "UNAUTHENTICATED" in without.stderr or "needs credentials" in without.stderr
    assert run_qm("types", server=server.address, env={"QM_CLIENT__TOKEN": token}).returncode == 0
    submit = run_qm("--token", token, "submit", "-T", "math", "-P", "1", server=server.address)
    assert submit.returncode == 4 and "needs role 'submit'" in submit.stderr, submit

    assert run_qm("token", "revoke", "dashboard", "--tokens-file", str(tokens.path)).returncode == 0
    after = run_qm("types", server=server.address, env={"QM_CLIENT__TOKEN": token})
    assert after.returncode == 4 and "revoked" in after.stderr, after


def test_a_listen_address_off_loopback_needs_tls_and_auth_or_insecure(rabbitmq, launcher, tokens):
    refused_start = launcher.server(rabbitmq.url, extra_args=["--listen", "0.0.0.0:0"], wait_ready=False)
    assert refused_start.wait(60) == 2
    assert "server.listen" in refused_start.stderr and "--insecure" in refused_start.stderr

    tokens_only = launcher.server(rabbitmq.url, wait_ready=False,
                                  extra_args=["--listen", "0.0.0.0:0", "--tokens-file", str(tokens.path)])
    assert tokens_only.wait(60) == 2 and "TLS" in tokens_only.stderr

    insecure = launcher.server(rabbitmq.url, extra_args=["--listen", "0.0.0.0:0", "--insecure"])
    assert "without TLS" in insecure.stderr
    assert_answers_normal_client(insecure.address)


def test_the_asyncio_client_and_the_executor_carry_their_token(rabbitmq, launcher, tokens):
    """qm.aio.Client (unary and streaming calls) and qm.Executor (its status stream) through a
    tokens-guarded server to a worker and back; without the token the Executor is refused."""
    secret = "executor-secret-of-the-auth-tests-0123456789"
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, extra_args=["--tokens-file", str(tokens.path)],
                             env={"QM_EXECUTOR__SECRET": secret})
    launcher.worker(rabbitmq.url, procs=1, queues=queue, env={"QM_EXECUTOR__SECRET": secret})

    async def through_aio() -> list:
        async with qm.aio.Client(server.address, token=tokens.submit) as client:
            task_id = await client.submit("math", "3 * 4", queue=queue)
            return [await client.result(task_id, timeout_s=RESULT_TIMEOUT_S),
                    [update.state async for update in client.watch([task_id])][-1]]

    assert asyncio.run(through_aio()) == ["12", "SUCCEEDED"]
    with qm.Executor(server.address, secret=secret, queue=queue, token=tokens.submit) as executor:
        assert executor.submit(pow, 2, 8).result(RESULT_TIMEOUT_S) == 256
    with qm.Executor(server.address, secret=secret, queue=queue) as anonymous:
        with pytest.raises(Exception) as refused_submit:  # the submit's error, on its future
            anonymous.submit(pow, 2, 8).result(RESULT_TIMEOUT_S)
    assert "UNAUTHENTICATED" in str(refused_submit.value) or "needs credentials" in str(refused_submit.value)
