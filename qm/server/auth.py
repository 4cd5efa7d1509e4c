"""Who is calling, and may they: the gRPC server interceptor of qm-server (and the worker
status endpoint).

A call is authenticated by a bearer token (metadata `authorization: Bearer qm_...`,
looked up in the tokens file, qm/security/tokens.py) or, when no token is sent, by the
verified client certificate of an mTLS connection whose common name is mapped to a role
(`server.client_cert_roles`). Then its method's role is checked (`METHOD_ROLES`):

    no credentials, unknown/expired/revoked token  → UNAUTHENTICATED (reason UNAUTHENTICATED)
    a role without the method's rights             → PERMISSION_DENIED (reason PERMISSION_DENIED)
    grpc.health.v1                                 → always open (probes)

The principal of an admitted call ("NAME:ROLE") is in a contextvar for the handler and
anything it calls: `current_principal()` (None when auth is off). Task ids are shared
within a deployment: any `read` principal may read any task, any `submit` one may cancel
any task (docs/security.md says why and how to separate tenants).
"""

from __future__ import annotations

import contextvars
import dataclasses
import ipaddress
import logging
import os
import time

import grpc

from qm.errors import PermissionDenied, QMError, Unauthenticated
from qm.security import tokens
from qm.server.servicer import abort_with

log = logging.getLogger(__name__)

#: Role needed per method name (the last part of the gRPC path); a method not listed here
#: under a guarded service needs `admin`, so a new RPC is closed until someone opens it.
METHOD_ROLES = {
    "SubmitTask": "submit",
    "SubmitTasks": "submit",
    "SubmitGroup": "submit",
    "GetGroupStatus": "read",
    "CancelTask": "submit",
    "GetTaskStatus": "read",
    "StreamTaskResults": "read",
    "ListWorkers": "read",
    "ListTaskTypes": "read",
    "ListDeadLetters": "admin",
    "RequeueDeadLetters": "admin",
    "PurgeDeadLetters": "admin",
    "AddSchedule": "submit",  # a schedule submits tasks: what a submit principal may do
    "RemoveSchedule": "submit",
    "ListSchedules": "read",
    "GetWorkerStatus": "read",
    "ServerReflectionInfo": "read",  # reflection follows auth
}
#: Services open to everyone: health probes.
OPEN_SERVICES = ("grpc.health.v1.Health",)
AUTHORIZATION_KEY = "authorization"
BEARER = "bearer "
#: Least time between two log lines about refused calls (a flood must not flood the log).
LOG_INTERVAL_S = 10.0

_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("qm_principal", default=None)


def current_principal() -> str | None:
    """The caller of the RPC being handled, as "NAME:ROLE" (tokens: the token's name;
    client certificates: "CN=<common name>"); None when auth is off."""
    return _principal.get()


@dataclasses.dataclass
class Authenticator:
    """Turns a call's metadata and TLS peer into a principal; reloads the tokens file when it
    changes on disk (so `qm token revoke` takes effect without a restart)."""

    tokens_file: str = ""
    cert_roles: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The config key of tokens_file, for error messages.
    key: str = "server.tokens_file"
    _entries: list[tokens.TokenEntry] = dataclasses.field(default_factory=list)
    _stamp: tuple[int, int, int] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file or self.cert_roles)

    def load(self) -> None:
        """(Re)read the tokens file if it changed; raises ConfigError at start-up."""
        if not self.tokens_file:
            return
        try:
            stat = os.stat(self.tokens_file)
        except OSError:
            stat = None
        if stat is None:
            self._entries = tokens.TokenFile(self.tokens_file, self.key).read()  # raises, naming the key
            return
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._entries = tokens.TokenFile(self.tokens_file, self.key).read()
            self._stamp = stamp

    def _refresh(self) -> None:
        try:
            self.load()
        except Exception as exc:  # a half-written or deleted file: keep serving the last good one
            log.warning(
                "tokens file %s unreadable, keeping the %d tokens read before: %s",
                self.tokens_file,
                len(self._entries),
                exc,
            )

    def principal(self, metadata, auth_context: dict) -> tuple[str, str]:
        """(name, role) of the caller; Unauthenticated, or PermissionDenied for a client
        certificate without a role."""
        header = next((value for key, value in metadata or () if key == AUTHORIZATION_KEY), None)
        if header is not None:
            if not isinstance(header, str) or not header.lower().startswith(BEARER):
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            if not self.tokens_file:
                raise Unauthenticated(
                    "this server takes no tokens (no server.tokens_file); authenticate with a client certificate"
                )
            self._refresh()
            match = tokens.lookup(self._entries, header[len(BEARER) :].strip())
            if match.entry is None or match.problem:
                raise Unauthenticated(f"{match.problem}; ask an admin for a new token (qm token create)")
            return match.entry.name, match.entry.role
        names = [name.decode() for name in auth_context.get("x509_common_name", ())]
        if names:
            role = self.cert_roles.get(names[0])
            if role is None:
                raise PermissionDenied(
                    f"client certificate CN={names[0]} has no role: add it to server.client_cert_roles or send a token"
                )
            return f"CN={names[0]}", role
        raise Unauthenticated(
            "this server needs credentials: send 'authorization: Bearer <token>' (qm --token, "
            "QM_CLIENT__TOKEN)" + (" or a client certificate" if self.cert_roles else "")
        )


def authorize(method: str, role: str, name: str) -> None:
    """PermissionDenied unless `role` has the rights `method` ("/pkg.Service/Name") needs."""
    short = method.rpartition("/")[2]
    needed = METHOD_ROLES.get(short, "admin")
    if not tokens.role_allows(role, needed):
        raise PermissionDenied(f"{short} needs role {needed!r}; {name} has role {role!r}")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a principal allowed to make them; sets current_principal()."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._refused_since_log = 0
        self._logged_at = -LOG_INTERVAL_S

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").startswith(OPEN_SERVICES):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._streaming(handler.stream_stream, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream, method))
        return handler._replace(stream_unary=self._unary(handler.stream_unary, method))

    async def _admit(self, context, method: str) -> None:
        try:
            name, role = self.authenticator.principal(context.invocation_metadata(), context.auth_context())
            authorize(method, role, name)
        except (Unauthenticated, PermissionDenied) as denied:
            self._log_refusal(method, context.peer(), denied)
            await abort_with(context, denied)  # the status and reason from the one error map
        _principal.set(f"{name}:{role}")

    def _log_refusal(self, method: str, peer: str, denied: QMError) -> None:
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL_S:
            log.warning(
                "refused %d call(s) since the last report; the latest: %s from %s, %s: %s",
                self._refused_since_log,
                method,
                peer,
                type(denied).__name__,
                denied,
            )
            self._refused_since_log, self._logged_at = 0, now

    def _unary(self, behavior, method: str):
        async def authenticated(request, context):
            await self._admit(context, method)
            return await behavior(request, context)

        return authenticated

    def _streaming(self, behavior, method: str):
        async def authenticated(request, context):
            await self._admit(context, method)
            async for response in behavior(request, context):
                yield response

        return authenticated


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
