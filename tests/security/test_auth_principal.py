"""current_principal(): what the auth interceptor tells the handler (and per-identity caps)
about the caller. In-process grpc.aio server, no broker."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc

from qm.client.credentials import ChannelSecurity
from qm.security.tls import ClientTLS, ServerTLS
from qm.security.tokens import TokenFile
from qm.server import auth
from tests.unit.aio import run


async def _whoami(request: bytes, context) -> bytes:
    return (auth.current_principal() or "-").encode()


@contextlib.asynccontextmanager
async def guarded_server(tokens: TokenFile, tls: ServerTLS | None = None,
                         cert_roles: dict[str, str] | None = None) -> AsyncIterator[str]:
    authenticator = auth.Authenticator(tokens.path, cert_roles or {})
    authenticator.load()
    server = grpc.aio.server(interceptors=[auth.AuthInterceptor(authenticator)])
    handler = grpc.method_handlers_generic_handler(
        "qm.v1.TaskQueue", {"ListTaskTypes": grpc.unary_unary_rpc_method_handler(_whoami),
                            "ListDeadLetters": grpc.unary_unary_rpc_method_handler(_whoami)})
    server.add_generic_rpc_handlers((handler,))
    port = (server.add_secure_port("127.0.0.1:0", tls.credentials()) if tls
            else server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _call(address: str, token: str, method: str = "ListTaskTypes", tls: ClientTLS | None = None) -> bytes:
    async with ChannelSecurity(tls, token).aio_channel(address) as channel:
        return await channel.unary_unary(f"/qm.v1.TaskQueue/{method}")(b"", timeout=10)


async def _refusal(address: str, token: str, method: str = "ListTaskTypes") -> grpc.aio.AioRpcError:
    try:
        await _call(address, token, method)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("answered; should have been refused")


def test_the_handler_sees_the_callers_name_and_role_and_refused_calls_never_reach_it(tmp_path):
    tokens = TokenFile(str(tmp_path / "tokens.json"))
    reader, submitter = tokens.create("read", "read-user"), tokens.create("submit", "submit-user")

    async def scenario():
        async with guarded_server(tokens) as address:
            assert await _call(address, reader) == b"read-user:read"
            assert await _call(address, submitter) == b"submit-user:submit"
            missing = await _refusal(address, "")
            denied = await _refusal(address, submitter, "ListDeadLetters")
            tokens.revoke("read-user")  # takes effect at the next call, no restart
            revoked = await _refusal(address, reader)
        assert missing.code() is grpc.StatusCode.UNAUTHENTICATED
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "ListDeadLetters needs role 'admin'; submit-user has role 'submit'" in denied.details()
        assert revoked.code() is grpc.StatusCode.UNAUTHENTICATED and "revoked" in revoked.details()

    run(scenario)


def test_over_mtls_a_certificate_or_a_token_names_the_caller(tmp_path, certs):
    """Both clients' secure channels (asyncio and blocking): a client certificate whose
    common name has a role, with no token; and a token, which decides when sent."""
    tokens = TokenFile(str(tmp_path / "tokens.json"))
    admin = tokens.create("admin", "operator")
    tls = ServerTLS.load(str(certs.server.cert), str(certs.server.key), str(certs.ca.cert), "server.")
    member = ClientTLS.load(str(certs.ca.cert), str(certs.client.cert), str(certs.client.key))

    async def scenario():
        async with guarded_server(tokens, tls, {"ci-runner": "submit"}) as address:
            by_certificate = await _call(address, "", tls=member)
            by_token = await _call(address, admin, tls=member)
            with ChannelSecurity(member, admin).channel(address) as channel:
                blocking = await asyncio.to_thread(channel.unary_unary("/qm.v1.TaskQueue/ListTaskTypes"), b"",
                                                   timeout=10)
        assert by_certificate == b"CN=ci-runner:submit"
        assert by_token == blocking == b"operator:admin"

    run(scenario)
