"""Typed QueueMaster configuration loaded from layered sources.

Precedence, per key: CLI flag (``overrides``) > environment
(``QM_<SECTION>__<KEY>``) > YAML file > built-in default.  With ``path=None``
the YAML file named by the ``QM_CONFIG`` environment variable is read when that
variable is set and non-empty; otherwise no file is read.  Every problem raises
``ConfigError(dotted_key, reason)`` naming what is wrong and where it came from.
"""

import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from qm.broker import topology
from qm.errors import ConfigError

log = logging.getLogger(__name__)

_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_ENV_PREFIX = "QM_"
_CONFIG_ENV = "QM_CONFIG"
_HOST_PORT_HINT = "HOST:PORT such as 127.0.0.1:50051 or [::1]:50051"


# ---------------------------------------------------------------- coercion ---
# Coercers and checks take a value and return the (normalised) value or raise
# ValueError with a reason; the caller appends the source.


def _to_int(raw: Any) -> int:
    """An int, or a string holding a decimal integer."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        return int(raw.strip())
    raise ValueError(f"expected an integer, got {raw!r}")


def _to_float(raw: Any) -> float:
    """A finite number, or a string holding one."""
    value: float | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        raise ValueError(f"expected a number, got {raw!r}")
    return value


_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return raw.strip().lower() in _TRUE_WORDS
    raise ValueError(f"expected true or false, got {raw!r}")


def _to_str(raw: Any) -> str:
    """A string (YAML scalars such as 123 must be quoted)."""
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r} (quote it in YAML)")
    return raw


def _to_names(raw: Any) -> list[str]:
    """A list of strings, or one comma-separated string; items stripped, empties dropped."""
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, (list, tuple)) and all(isinstance(i, str) for i in raw):
        items = list(raw)
    else:
        raise ValueError(f"expected a list of names or a comma-separated string like 'a,b', got {raw!r}")
    return [item.strip() for item in items if item.strip()]


def _to_prefetch(raw: Any) -> int | str:
    """'auto', or a positive integer (given as int or digits), parsed once here."""
    text = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
    if text is not None and text.lower() == "auto":
        return "auto"
    if text is not None and text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"expected 'auto' or a positive integer, got {raw!r}")


def _at_least(low: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value < low:
            raise ValueError(f"must be >= {low}, got {value!r}")
        return value

    return check


def _above(low: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value <= low:
            raise ValueError(f"must be > {low}, got {value!r}")
        return value

    return check


def _at_most(high: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value > high:
            raise ValueError(f"must be <= {high}, got {value!r}")
        return value

    return check


def _one_of(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def check(value: str) -> str:
        normal = value.strip().upper() if upper else value
        if normal not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return normal

    return check


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _host_port(allow_port_zero: bool) -> Callable[[str], str]:
    def check(value: str) -> str:
        _, port = parse_host_port(value)
        if port == 0 and not allow_port_zero:
            raise ValueError(f"port 0 only makes sense for server.listen; give the server's real port, got {value!r}")
        return value.strip()

    return check


def _host_ports(value: str) -> str:
    """One HOST:PORT or several, comma-separated (clients fail over between them)."""
    addresses = [part.strip() for part in value.split(",")]
    if not all(addresses):
        raise ValueError(f"expected {_HOST_PORT_HINT}, or several separated by commas, got {value!r}")
    check = _host_port(allow_port_zero=False)
    return ",".join(check(address) for address in addresses)


def _optional_host_port(value: str) -> str:
    return value if value == "" else _host_port(allow_port_zero=True)(value)


def _amqp_url(value: str) -> str:
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        parts = urlsplit("")
    if parts.scheme.lower() not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(
            "expected an AMQP URL starting with amqp:// or amqps:// "
            f"(e.g. amqp://guest:guest@127.0.0.1:5672/%2F), got {redact_url(value)!r}"
        )
    return value.strip()


#: Schemes of server.store_url: the embedded SQLite store, or a PostgreSQL shared by servers.
SQLITE_URL_PREFIX = "sqlite:///"
POSTGRES_URL_SCHEMES = ("postgresql", "postgres")


def _store_url(value: str) -> str:
    """ "" (SQLite in the data dir), sqlite:///PATH, or postgresql://USER@HOST:PORT/DB."""
    text = value.strip()
    if text == "":
        return text
    if text.startswith(SQLITE_URL_PREFIX) and len(text) > len(SQLITE_URL_PREFIX):
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = urlsplit("")
    if parts.scheme.lower() in POSTGRES_URL_SCHEMES and parts.hostname and parts.path.strip("/"):
        return text
    raise ValueError(
        "expected sqlite:///PATH (relative; sqlite:////abs/path for an absolute one) or "
        f"postgresql://USER@HOST:PORT/DATABASE, got {redact_url(text)!r}"
    )


def _to_amqp_urls(raw: Any) -> list[str]:
    """A list of AMQP URLs, or one comma-separated string of them (a comma inside a URL is %2C)."""
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, (list, tuple)) and all(isinstance(i, str) for i in raw):
        items = list(raw)
    else:
        raise ValueError(f"expected a list of AMQP URLs or one comma-separated string of them, got {raw!r}")
    return [_amqp_url(item) for item in items if item.strip()]


#: Longest server id, in UTF-8 bytes: it goes into AMQP queue names (at most 255 bytes,
#: e.g. "qm.heartbeats.<id>") and into the store's file name ("<id>.sqlite3").
SERVER_ID_MAX_BYTES = 200


def check_server_id(value: str) -> str:
    """A server id names files and RabbitMQ queues; "" means "not set"."""
    if value == "":
        return value
    if (
        len(value.encode("utf-8")) > SERVER_ID_MAX_BYTES
        or value in (".", "..")
        or any(ch == "/" or ch.isspace() or not ch.isprintable() for ch in value)
    ):
        raise ValueError(
            f"a server id names files and RabbitMQ queues: 1 to {SERVER_ID_MAX_BYTES} bytes, "
            f"no '/', spaces or control characters, not '.' or '..'; got {value!r}"
        )
    return value


def _queue_names(names: list[str]) -> list[str]:
    if not names:
        raise ValueError("needs at least one queue name, e.g. 'default' or 'a,b'")
    for name in names:
        problem = topology.queue_name_problem(name)
        if problem:
            raise ValueError(problem)
    if len(set(names)) != len(names):
        raise ValueError(f"lists a queue more than once: {names!r}")
    return names


#: Shortest executor secret: 32 characters (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`).
MIN_SECRET_LENGTH = 32
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_ROLES = ("read", "submit", "admin")


def _secret_length(value: str) -> str:
    if value and len(value) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"must be at least {MIN_SECRET_LENGTH} characters, got {len(value)}; generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


def _key_id(value: str) -> str:
    if not _KEY_ID.fullmatch(value):
        raise ValueError(f"expected 1 to 32 letters, digits, _ . -, got {value!r}")
    return value


def _previous_secrets(items: list[str]) -> list[str]:
    for item in items:
        key_id, sep, secret = item.partition(":")
        if not sep:
            raise ValueError("expected KEY_ID:SECRET items, e.g. '1:<old secret>'")
        _key_id(key_id)
        _secret_length(secret)
    return items


def _cert_roles(items: list[str]) -> list[str]:
    for item in items:
        name, sep, role = item.rpartition(":")
        if not sep or not name or role not in _ROLES:
            raise ValueError(f"expected COMMON_NAME:ROLE items with a role of {', '.join(_ROLES)}, got {item!r}")
    return items


def _allowed_queues(names: list[str]) -> list[str]:
    """server.queues: queue names, or glob patterns (`*` for any run of name characters)."""
    if not names:
        raise ValueError("needs at least one queue name, e.g. 'default' or 'default,reports'")
    for name in names:
        problem = topology.queue_name_problem(name.replace("*", "x"))
        if problem:
            raise ValueError(problem + " (a pattern may use * as well)")
    return names


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) into (host, port), port 0..65535.

    The host is returned without brackets.  Raises ValueError if malformed.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected {_HOST_PORT_HINT}, got {text!r}")
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port):
        raise ValueError(f"expected {_HOST_PORT_HINT}, got {text!r}")
    if int(port) > 65535:
        raise ValueError(f"port must be 0..65535, got {text!r}")
    return _parse_host(host, text), int(port)


def _parse_host(host: str, text: str) -> str:
    """Validate the host part of HOST:PORT; strip IPv6 brackets."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address in brackets, in {text!r}") from None
    if ":" in host:
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. [::1]:50051, got {text!r}")
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"expected {_HOST_PORT_HINT}, got {text!r}")
    return host


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and display)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        userinfo = f"{parts.username or ''}:***"
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))
    except ValueError:
        return "<unparseable URL>"


# ----------------------------------------------------------------- schema ---


def _setting(default: Any, coerce: Callable[[Any], Any], *checks: Callable[[Any], Any]) -> Any:
    """A dataclass field carrying its coercer and checks as metadata."""
    meta = {"coerce": coerce, "checks": checks}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class BrokerConfig:
    """RabbitMQ connection settings."""

    url: str = _setting("amqp://guest:guest@127.0.0.1:5672/%2F", _to_str, _amqp_url)
    urls: list[str] = _setting([], _to_amqp_urls)  # one per cluster node; when set, `url` is not used
    heartbeat_s: int = _setting(30, _to_int, _at_least(0), _at_most(65535))
    reconnect_max_delay_s: float = _setting(10.0, _to_float, _above(0))
    queue_type: str = _setting("quorum", _to_str, _one_of("classic", "quorum"))
    delivery_limit: int = _setting(5, _to_int, _above(0))
    consumer_timeout_s: float = _setting(1800.0, _to_float, _above(0))
    max_queue_length: int = _setting(1_000_000, _to_int, _at_least(0))
    quorum_initial_group_size: int = _setting(0, _to_int, _at_least(0))  # 0: RabbitMQ's default
    server_queue_type: str = _setting("classic", _to_str, _one_of("classic", "quorum"))
    #: A file whose first line replaces the password in `url` and every `urls` entry (keeps it
    #: off command lines).
    password_file: str = _setting("", _to_str)
    #: amqps:// (TLS): the CA of RabbitMQ's certificate, and this client's own for mutual TLS.
    tls_ca: str = _setting("", _to_str)
    tls_cert: str = _setting("", _to_str)
    tls_key: str = _setting("", _to_str)

    @property
    def node_urls(self) -> list[str]:
        """The nodes to connect to, in order: `urls` if set, else the one `url`."""
        return list(self.urls) if self.urls else [self.url]


@dataclass(frozen=True)
class ServerConfig:
    """qm-server settings."""

    listen: str = _setting("127.0.0.1:50051", _to_str, _host_port(allow_port_zero=True))
    data_dir: str = _setting("qm-data", _to_str, _non_empty)
    id: str = _setting("", _to_str, check_server_id)
    store_url: str = _setting("", _to_str, _store_url)
    store_pool_size: int = _setting(10, _to_int, _above(0), _at_most(1000))
    max_payload_bytes: int = _setting(1048576, _to_int, _above(0))
    max_batch_items: int = _setting(1000, _to_int, _above(0))
    #: Most tiny tasks of a SubmitTasks call sent in one work-queue message (qm/server/bundling.py); 1 = off.
    bundle_max_tasks: int = _setting(16, _to_int, _above(0), _at_most(1000))
    grace_s: float = _setting(5.0, _to_float, _at_least(0))
    max_concurrent_rpcs: int = _setting(4000, _to_int, _at_least(0))
    default_task_timeout_s: float = _setting(600.0, _to_float, _above(0))
    default_task_memory_limit_mb: int = _setting(0, _to_int, _at_least(0))
    default_max_retries: int = _setting(0, _to_int, _at_least(0), _at_most(100))
    default_retry_backoff_s: float = _setting(1.0, _to_float, _at_least(0))
    default_retry_backoff_max_s: float = _setting(300.0, _to_float, _at_least(0))
    default_retry_jitter: bool = _setting(True, _to_bool)
    default_retry_on_timeout: bool = _setting(False, _to_bool)
    retention_s: float = _setting(604800.0, _to_float, _above(0))
    metrics_port: int = _setting(0, _to_int, _at_least(0), _at_most(65535))
    worker_lost_after_s: float = _setting(30.0, _to_float, _above(0))
    reconcile_interval_s: float = _setting(30.0, _to_float, _above(0))
    reconcile_after_s: float = _setting(60.0, _to_float, _above(0))
    max_delay_s: float = _setting(604800.0, _to_float, _above(0), _at_most(604800.0))
    tls_cert: str = _setting("", _to_str)
    tls_key: str = _setting("", _to_str)
    tls_client_ca: str = _setting("", _to_str)
    tokens_file: str = _setting("", _to_str)
    #: Roles of mTLS client certificates without a token, as "COMMON_NAME:ROLE" items.
    client_cert_roles: list[str] = _setting([], _to_names, _cert_roles)
    insecure: bool = _setting(False, _to_bool)
    # Caps and quotas on what a client controls (qm/server/caps.py, qm/server/quotas.py).
    queues: list[str] = _setting(["default"], _to_names, _allowed_queues)
    max_task_timeout_s: float = _setting(1800.0, _to_float, _above(0))
    max_task_memory_limit_mb: int = _setting(0, _to_int, _at_least(0))
    max_retries: int = _setting(20, _to_int, _at_least(0), _at_most(100))
    max_task_cpus: int = _setting(64, _to_int, _above(0), _at_most(1024))
    max_message_bytes: int = _setting(4194304, _to_int, _at_least(1024))
    max_concurrent_streams: int = _setting(1000, _to_int, _above(0))
    max_stream_ids: int = _setting(10000, _to_int, _above(0))
    max_stream_s: float = _setting(3600.0, _to_float, _above(0))
    submit_rate_per_s: float = _setting(2000.0, _to_float, _at_least(0))
    submit_burst: int = _setting(4000, _to_int, _above(0))
    validate_timeout_s: float = _setting(1.0, _to_float, _above(0))
    validate_threads: int = _setting(4, _to_int, _above(0))
    max_dead_letters_listed: int = _setting(1000, _to_int, _above(0))
    dead_letter_retention_s: float = _setting(2592000.0, _to_float, _above(0))
    # Periodic schedules (qm/server/scheduler.py).
    max_schedules: int = _setting(1000, _to_int, _above(0))
    schedule_grace_s: float = _setting(30.0, _to_float, _at_least(0))


@dataclass(frozen=True)
class WorkerConfig:
    """Worker pool settings."""

    procs: int = _setting(0, _to_int, _at_least(0))
    pin_cpus: bool = _setting(True, _to_bool)  # pin tasks to their slots' CPUs when procs <= CPUs
    queues: list[str] = _setting(["default"], _to_names, _queue_names)
    prefetch: int | str = _setting("auto", _to_prefetch)  # a number of deliveries, or "auto"
    id: str = _setting("", _to_str)
    start_method: str = _setting("forkserver", _to_str, _one_of("forkserver", "spawn"))
    task_timeout_s: float = _setting(0.0, _to_float, _at_least(0))
    task_memory_limit_mb: int = _setting(0, _to_int, _at_least(0))
    memory_check_interval_s: float = _setting(0.05, _to_float, _above(0))
    max_tasks_per_child: int = _setting(0, _to_int, _at_least(0))
    max_child_idle_rss_mb: int = _setting(1024, _to_int, _at_least(0))
    address_space_limit: bool = _setting(True, _to_bool)
    drain_timeout_s: float = _setting(60.0, _to_float, _at_least(0))
    status_listen: str = _setting("127.0.0.1:0", _to_str, _optional_host_port)
    metrics_port: int = _setting(0, _to_int, _at_least(0), _at_most(65535))
    heartbeat_interval_s: float = _setting(5.0, _to_float, _above(0))
    #: While recent runs are shorter, a run is announced (RUNNING) once it has lasted this
    #: long; a shorter one's start rides with its outcome event. 0 = always at once.
    running_event_delay_s: float = _setting(0.05, _to_float, _at_least(0), _at_most(60))
    #: Events handed over together or behind another event's confirm go out packed in one
    #: message (qm/worker/event_packs.py). Servers older than packs drop them: false while any is.
    pack_events: bool = _setting(True, _to_bool)
    #: Run the supervisor as SCHED_BATCH: its wake-ups do not preempt running tasks
    #: (qm/worker/sched_policy.py).
    sched_batch: bool = _setting(True, _to_bool)
    #: The status endpoint's TLS and tokens, as server.tls_* and server.tokens_file.
    status_tls_cert: str = _setting("", _to_str)
    status_tls_key: str = _setting("", _to_str)
    status_tls_client_ca: str = _setting("", _to_str)
    status_tokens_file: str = _setting("", _to_str)
    #: Allow status_listen off loopback without TLS and tokens (as server.insecure).
    status_insecure: bool = _setting(False, _to_bool)
    max_result_bytes: int = _setting(1048576, _to_int, _above(0))


@dataclass(frozen=True)
class ClientConfig:
    """Client settings."""

    server: str = _setting("127.0.0.1:50051", _to_str, _host_ports)
    tls_ca: str = _setting("", _to_str)
    tls_cert: str = _setting("", _to_str)
    tls_key: str = _setting("", _to_str)
    token: str = _setting("", _to_str)
    #: Most task ids one results stream follows (a wait over more takes several, one after
    #: another). A server whose server.max_stream_ids is lower names it when it refuses a
    #: stream, and the clients go on with that.
    stream_ids: int = _setting(10000, _to_int, _above(0))


@dataclass(frozen=True)
class ExecutorConfig:
    """The `python` task type (qm.Executor): off unless a shared secret is set."""

    secret: str = _setting("", _to_str, _secret_length)
    #: A file holding the secret (first line), instead of `secret`.
    secret_file: str = _setting("", _to_str)
    #: Id of `secret`, written into every signature (rotation: see previous_secrets).
    key_id: str = _setting("1", _to_str, _key_id)
    #: Older secrets still accepted, as "KEY_ID:SECRET" items; new signatures use `secret`.
    previous_secrets: list[str] = _setting([], _to_names, _previous_secrets)
    #: How long a signed payload may be submitted after it was signed (replay window).
    signature_ttl_s: float = _setting(300.0, _to_float, _above(0))


@dataclass(frozen=True)
class LogConfig:
    """Logging settings."""

    level: str = _setting("INFO", _to_str, _one_of("DEBUG", "INFO", "WARNING", "ERROR", upper=True))
    format: str = _setting("text", _to_str, _one_of("text", "json"))


@dataclass(frozen=True)
class Config:
    """All settings, one frozen dataclass per section."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self, redact: bool = True) -> dict[str, dict[str, Any]]:
        """Nested plain dict for display; the broker password is masked unless redact=False."""
        data = asdict(self)
        if redact:
            data["broker"]["url"] = redact_url(data["broker"]["url"])
            data["broker"]["urls"] = [redact_url(url) for url in data["broker"]["urls"]]
            data["server"]["store_url"] = redact_url(data["server"]["store_url"])
            data["executor"]["secret"] = "***" if data["executor"]["secret"] else ""
            data["executor"]["previous_secrets"] = [
                f"{item.partition(':')[0]}:***" for item in data["executor"]["previous_secrets"]
            ]
            data["client"]["token"] = "***" if data["client"]["token"] else ""
        return data


# ---------------------------------------------------------------- loading ---


def env_var_name(section: str, key: str) -> str:
    """The environment variable that sets ``section.key``."""
    return f"{_ENV_PREFIX}{section.upper()}__{key.upper()}"


def _sections() -> dict[str, Any]:
    # Field.type is typed `type | str`; here it is always a section's dataclass (no string
    # annotations in this module).
    return {f.name: f.type for f in fields(Config)}


def _section_fields(section: str, source: str) -> dict[str, Any]:
    """Fields of a known section, else ConfigError listing the known sections."""
    sections = _sections()
    if section not in sections:
        known = ", ".join(sections)
        raise ConfigError(section, f"unknown section {section!r} (from {source}); known sections: {known}")
    return {f.name: f for f in fields(sections[section])}


#: Keys that are still accepted (and checked) so that existing configurations keep
#: starting, but no longer do anything; a warning says so, naming where they were set.
DEPRECATED_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "worker.soft_timeout_grace_s": (
        _to_float,
        (
            "is deprecated and ignored: the soft timeout is no longer derived from the time limit (it shortened "
            "the time a task gets). A task gets qm.SoftTimeout only at an explicit soft_timeout_s, of its task "
            "type or its submission (qm submit --soft-timeout)"
        ),
    ),
}


def _deprecated(section: str, key: str, raw: Any, source: str) -> bool:
    """True for a deprecated key: its value is checked, a warning logged, and it is dropped."""
    dotted = f"{section}.{key}"
    if dotted not in DEPRECATED_KEYS:
        return False
    coerce, reason = DEPRECATED_KEYS[dotted]
    try:
        coerce(raw)
    except ValueError as exc:
        raise ConfigError(dotted, f"{exc} (from {source}); this key {reason}") from None
    log.warning("%s (from %s) %s; remove it", dotted, source, reason)
    return True


def _convert(section: str, key: str, raw: Any, source: str) -> Any:
    """Coerce and check one raw value; ConfigError names key, problem and source."""
    known = _section_fields(section, source)
    dotted = f"{section}.{key}"
    if key not in known:
        listed = ", ".join(known)
        raise ConfigError(dotted, f"unknown key {key!r} (from {source}); known keys of {section}: {listed}")
    spec = known[key]
    try:
        value = spec.metadata["coerce"](raw)
        for check in spec.metadata["checks"]:
            value = check(value)
    except ValueError as exc:
        raise ConfigError(dotted, f"{exc} (from {source})") from None
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return str(exc)
    return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(exc, 'problem', None) or exc}"


def _read_yaml(name: str, origin: str) -> dict[Any, Any]:
    """Parse the YAML file; its top level must be a mapping (empty file = {})."""
    try:
        with open(name, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(name, f"config file not found{origin}; check the path") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot read config file{origin}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, f"config file{origin} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"invalid YAML{origin} at {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        known = ", ".join(_sections())
        reason = f"top level must be a mapping of sections ({known}), got {_kind(data)}{origin}"
        raise ConfigError(name, reason)
    return data


_Entry = tuple[str, str, Any, str]  # (section, key, raw value, source description)


def _file_entries(path: str | os.PathLike | None, env: Mapping[str, str]) -> Iterator[_Entry]:
    """(section, key, raw, source) from the YAML file given or named by QM_CONFIG."""
    origin = ""
    if path is None and env.get(_CONFIG_ENV):
        path, origin = env[_CONFIG_ENV], f" (named by env {_CONFIG_ENV})"
    if path is None:
        return
    name = os.fspath(path)
    source = f"file {name}{origin}"
    for section, body in _read_yaml(name, origin).items():
        _section_fields(str(section), source)
        if body is None:  # a section whose keys are all commented out
            continue
        if not isinstance(body, dict):
            reason = f"section must be a mapping of keys, got {_kind(body)} (from {source})"
            raise ConfigError(str(section), reason)
        for key, raw in body.items():
            yield str(section), str(key), raw, source


def _env_entries(env: Mapping[str, str]) -> Iterator[_Entry]:
    """(section, key, raw, source) from QM_<SECTION>__<KEY> variables (QM_CONFIG excluded)."""
    for name in sorted(env):
        if not name.startswith(_ENV_PREFIX) or name == _CONFIG_ENV:
            continue
        section, sep, key = name[len(_ENV_PREFIX) :].lower().partition("__")
        if not sep:
            # Not of the QM_<SECTION>__<KEY> form: someone else's variable (QM_SRC=...), not
            # a typo of ours. Names of that form are checked strictly: a typo stops start-up.
            log.debug("ignoring environment variable %s (not of the form QM_<SECTION>__<KEY>)", name)
            continue
        if not section or not key:
            raise ConfigError(
                name[len(_ENV_PREFIX) :].lower(),
                f"environment variable {name} names no setting; use QM_<SECTION>__<KEY> "
                f"such as QM_SERVER__LISTEN (sections: {', '.join(_sections())}) or unset it",
            )
        yield section, key, env[name], f"env {name}"


def _override_entries(overrides: Mapping[str, object]) -> Iterator[_Entry]:
    """(section, key, raw, source) from dotted CLI overrides; None means 'flag not given'."""
    for dotted, raw in overrides.items():
        if raw is None:
            continue
        section, sep, key = dotted.partition(".")
        if not sep:
            reason = "override keys must be dotted paths like 'server.listen' (from command-line flag)"
            raise ConfigError(dotted, reason)
        yield section, key, raw, f"command-line flag for {dotted}"


def load_config(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the Config: flag > env > file > default, per key.

    ``path=None`` reads the file named by env ``QM_CONFIG`` if set, else no file.
    ``env=None`` uses ``os.environ``.  ``overrides`` maps dotted keys
    (``"server.listen"``) to flag values; None values are ignored.
    Every layer is validated even where a higher layer overrides it.
    """
    env = os.environ if env is None else env
    values = {name: asdict(cls()) for name, cls in _sections().items()}
    layers = (_file_entries(path, env), _env_entries(env), _override_entries(overrides or {}))
    for layer in layers:
        for section, key, raw, source in layer:
            if not _deprecated(section, key, raw, source):
                values[section][key] = _convert(section, key, raw, source)
    return Config(**{name: cls(**values[name]) for name, cls in _sections().items()})


def read_secret_file(path: str, key: str) -> str:
    """The first line of a secret file (`*_file` keys); ConfigError naming `key`."""
    try:
        with open(path, encoding="utf-8") as stream:
            secret = stream.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(key, f"{path!r} is empty; its first line must hold the secret")
    return secret


#: Environment variables that may carry secrets: dropped from the process environment once
#: the configuration is read, so child processes (task code) never inherit them.
SECRET_ENV_PREFIXES = ("QM_EXECUTOR__", "QM_BROKER__URL", "QM_BROKER__PASSWORD", "QM_CLIENT__TOKEN")


def scrub_secret_env(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Remove secret-bearing QM_* variables from the environment; return their names."""
    names = [name for name in environ if name.startswith(SECRET_ENV_PREFIXES)]
    for name in names:
        del environ[name]
    return names
