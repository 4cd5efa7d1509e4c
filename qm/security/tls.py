"""TLS material for gRPC: read PEM files once at start, with errors that name the key.

Server: a certificate and its key, plus optionally a CA whose certificates clients must
present (mTLS: `require_client_auth`). Client: the CA that signed the server's
certificate, plus optionally its own certificate and key for mTLS.
"""

from __future__ import annotations

import dataclasses
import ssl

import grpc

from qm.errors import ConfigError


def read_pem(path: str, key: str) -> bytes:
    """The file's bytes; ConfigError naming `key` when missing, unreadable or not PEM."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise ConfigError(key, f"file {path!r} not found") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(key, f"{path!r} is not a PEM file (no -----BEGIN line)")
    return data


def check_pair(cert: str, key: str, prefix: str) -> None:
    """ConfigError unless `key` is the private key of the certificate in `cert` (gRPC would
    only say "Failed to bind")."""
    read_pem(cert, f"{prefix}tls_cert")
    read_pem(key, f"{prefix}tls_key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{prefix}tls_key",
            f"{key!r} and the certificate {cert!r} do not make a pair "
            f"({exc.reason or exc}): is it the certificate's own key, "
            "unencrypted PEM?",
        ) from None


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key (PEM), and the CA of client certificates (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def load(cls, cert: str, key: str, client_ca: str, prefix: str) -> "ServerTLS | None":
        """From the paths of keys `prefix`tls_cert/tls_key/tls_client_ca (prefix "server."
        or "worker.status_"); None when TLS is off."""
        if not cert and not key:
            if client_ca:
                raise ConfigError(
                    f"{prefix}tls_client_ca", f"needs {prefix}tls_cert and {prefix}tls_key (mTLS runs on top of TLS)"
                )
            return None
        if not cert or not key:
            missing = "tls_cert" if not cert else "tls_key"
            raise ConfigError(f"{prefix}{missing}", "TLS needs both a certificate and its private key")
        check_pair(cert, key, prefix)
        return cls(
            read_pem(cert, f"{prefix}tls_cert"),
            read_pem(key, f"{prefix}tls_key"),
            read_pem(client_ca, f"{prefix}tls_client_ca") if client_ca else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """What a client trusts (CA of the server certificate) and, for mTLS, who it is."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def load(
        cls, ca: str | None, cert: str | None = None, key: str | None = None, section: str = "client"
    ) -> "ClientTLS | None":
        """From file paths (None/empty: not given); None when TLS is off."""
        if bool(cert) != bool(key):
            missing = "tls_cert" if not cert else "tls_key"
            raise ConfigError(f"{section}.{missing}", "a client certificate needs its key and the key its certificate")
        if not ca:
            if cert:
                raise ConfigError(f"{section}.tls_ca", "a client certificate (mTLS) needs the server's CA too")
            return None
        if cert and key:
            check_pair(cert, key, f"{section}.")
        return cls(
            read_pem(ca, f"{section}.tls_ca"),
            read_pem(cert, f"{section}.tls_cert") if cert else None,
            read_pem(key, f"{section}.tls_key") if key else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
