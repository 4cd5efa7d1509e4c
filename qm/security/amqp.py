"""What qm-server and qm-worker hand pika for RabbitMQ: the node URLs with the password
from `broker.password_file`, and an SSLContext for amqps:// nodes from `broker.tls_*`
keys (so CA, certificate and key are config keys, not pika URL query strings)."""

from __future__ import annotations

import ssl
from urllib.parse import quote, urlsplit, urlunsplit

from qm.config import BrokerConfig, read_secret_file
from qm.errors import ConfigError


def broker_urls(broker: BrokerConfig) -> list[str]:
    """The node URLs (broker.urls, else broker.url), each with its password replaced by the
    first line of broker.password_file if set."""
    if not broker.password_file:
        return broker.node_urls
    password = read_secret_file(broker.password_file, "broker.password_file")
    return [_with_password(url, password) for url in broker.node_urls]


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "guest"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def ssl_context(broker: BrokerConfig) -> ssl.SSLContext | None:
    """A client SSLContext verifying RabbitMQ's certificate (broker.tls_ca, else the system
    CAs) with this client's certificate for mutual TLS; None when no node is amqps://."""
    if not any(urlsplit(url).scheme.lower() == "amqps" for url in broker.node_urls):
        if broker.tls_ca or broker.tls_cert:
            raise ConfigError(
                "broker.url",
                "broker.tls_* keys are set but no broker URL is amqps://; use "
                "amqps:// (RabbitMQ's TLS port, 5671 by default)",
            )
        return None
    if bool(broker.tls_cert) != bool(broker.tls_key):
        raise ConfigError(
            "broker.tls_cert" if not broker.tls_cert else "broker.tls_key",
            "a client certificate needs its key and the key its certificate",
        )
    try:
        context = ssl.create_default_context(cafile=broker.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("broker.tls_ca", f"cannot load CA file {broker.tls_ca!r}: {exc}") from None
    if broker.tls_cert:
        try:
            context.load_cert_chain(broker.tls_cert, broker.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "broker.tls_cert", f"cannot load {broker.tls_cert!r} with key {broker.tls_key!r}: {exc}"
            ) from None
    return context
