"""How a client proves who it is and checks whom it talks to: TLS (qm/security/tls.py)
and a bearer token, put on every call by a channel interceptor.

The token travels as metadata `authorization: Bearer <token>`; gRPC's own call
credentials would refuse a plaintext channel, and a loopback server without TLS may
still want tokens, so an interceptor adds it instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc

from qm.security.tls import ClientTLS

AUTHORIZATION_KEY = "authorization"


@dataclasses.dataclass(frozen=True)
class ChannelSecurity:
    """TLS material and token of a client; the default is plaintext without a token."""

    tls: ClientTLS | None = None
    token: str = ""

    @classmethod
    def load(
        cls,
        tls_ca: str | None = None,
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> "ChannelSecurity":
        """From file paths and a token (None/empty: not given); ConfigError for a bad file."""
        return cls(ClientTLS.load(tls_ca, tls_cert, tls_key), token or "")

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: Any = ()) -> grpc.Channel:
        """A blocking channel to `address`."""
        if self.tls is not None:
            channel = grpc.secure_channel(address, self.tls.credentials(), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(self._metadata()))
        return channel

    def aio_channel(self, address: str, options: Any = ()) -> grpc.aio.Channel:
        """An asyncio channel to `address`."""
        interceptors = [cls(self._metadata()) for cls in _AIO_INTERCEPTORS] if self.token else None
        if self.tls is not None:
            return grpc.aio.secure_channel(address, self.tls.credentials(), options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class _Details(grpc.ClientCallDetails):
    """A mutable-by-copy ClientCallDetails (grpc's own is an abstract class)."""

    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the authorization metadata to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details) -> _Details:
        return _Details(
            details.method,
            details.timeout,
            tuple(details.metadata or ()) + self.metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _AioToken:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ()) + self.metadata))
        return details._replace(metadata=metadata)


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


_AIO_INTERCEPTORS = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
