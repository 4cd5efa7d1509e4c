"""What the hostile-client suite shares: certificates made with the openssl CLI, tokens,
raw gRPC stubs, and the checks every case ends with (the server still answers a normal
client within 1 s; nothing was stored or enqueued)."""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sqlite3
import subprocess
import threading
from typing import Callable, Iterator

import grpc
import pika
import pika.exceptions

from qm._proto.qm.v1 import task_queue_pb2, task_queue_pb2_grpc
from qm.broker import topology
from qm.client.credentials import ChannelSecurity
from qm.security.tls import ClientTLS
from qm.security.tokens import TokenFile

#: A normal client's deadline while and after hostile calls hit the server (issue 12).
NORMAL_DEADLINE_S = 1.0
#: Tries of one probe: a probe fails only if every try misses the 1 s deadline, so one
#: scheduling hiccup of a shared 2-core machine does not fail the suite.
PROBE_TRIES = 3
OPENSSL_TIMEOUT_S = 60.0


# ------------------------------------------------------------------ certificates ---

@dataclasses.dataclass(frozen=True)
class CA:
    cert: pathlib.Path
    key: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Pair:
    cert: pathlib.Path
    key: pathlib.Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=OPENSSL_TIMEOUT_S)


def make_ca(directory: pathlib.Path, name: str) -> CA:
    ca = CA(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(ca.key), "-out", str(ca.cert),
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def make_cert(ca: CA, directory: pathlib.Path, name: str, server: bool) -> Pair:
    """A certificate signed by `ca`: for a server (SAN 127.0.0.1 and localhost) or a client."""
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    extensions.write_text(f"extendedKeyUsage={usage}\n"
                          + ("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(pair.key),
             "-out", str(request))
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(pair.cert))
    return pair


@dataclasses.dataclass(frozen=True)
class Certificates:
    """One trusted CA with a server and a client certificate; another CA with its own client."""

    ca: CA
    server: Pair
    client: Pair
    other_ca: CA
    stranger: Pair  # a client certificate from other_ca
    nobody: Pair  # a client certificate from ca whose common name no role lists


def make_certificates(directory: pathlib.Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = make_ca(directory, "qm-test-ca"), make_ca(directory, "another-ca")
    return Certificates(ca, make_cert(ca, directory, "qm-server", server=True),
                        make_cert(ca, directory, "ci-runner", server=False), other,
                        make_cert(other, directory, "stranger", server=False),
                        make_cert(ca, directory, "nobody", server=False))


# ------------------------------------------------------------------------ tokens ---

@dataclasses.dataclass(frozen=True)
class Tokens:
    path: pathlib.Path
    read: str
    submit: str
    admin: str


def make_tokens(path: pathlib.Path) -> Tokens:
    tokens = TokenFile(str(path))
    return Tokens(path, tokens.create("read", "reader"), tokens.create("submit", "submitter"),
                  tokens.create("admin", "operator"))


# ------------------------------------------------------------------- raw clients ---

@contextlib.contextmanager
def stub(address: str, token: str = "", tls: ClientTLS | None = None) -> Iterator[task_queue_pb2_grpc.TaskQueueStub]:
    """A TaskQueue stub over a channel with exactly these credentials (none by default)."""
    with ChannelSecurity(tls, token).channel(address) as channel:
        yield task_queue_pb2_grpc.TaskQueueStub(channel)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError `call` raises (it must raise one)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call was answered; it should have been refused")


def submit_request(queue: str, payload: bytes = b"1 + 1", key: str = "") -> task_queue_pb2.SubmitTaskRequest:
    return task_queue_pb2.SubmitTaskRequest(type="math", payload=payload, queue=queue, idempotency_key=key)


# ----------------------------------------------------------------- the end checks ---

def probe(call: Callable[[float], object]) -> grpc.StatusCode | None:
    """One probe of a normal client: `call(deadline_s)` answered within NORMAL_DEADLINE_S at
    one of PROBE_TRIES tries; None if so, else the last try's status code."""
    code = None
    for _ in range(PROBE_TRIES):
        try:
            call(NORMAL_DEADLINE_S)
            return None
        except grpc.RpcError as exc:
            code = exc.code()
    return code


def assert_answers_normal_client(address: str, token: str = "", tls: ClientTLS | None = None,
                                 probes: int = 3) -> None:
    """`probes` times: a normal client's ListTaskTypes answers within NORMAL_DEADLINE_S
    (a gRPC deadline, up to PROBE_TRIES tries each)."""
    with stub(address, token, tls) as normal:
        def list_types(deadline_s: float) -> None:
            types = normal.ListTaskTypes(task_queue_pb2.ListTaskTypesRequest(), timeout=deadline_s)
            assert "math" in [t.name for t in types.types]

        for _ in range(probes):
            code = probe(list_types)
            assert code is None, f"a normal client got no answer within {NORMAL_DEADLINE_S} s: {code}"


@contextlib.contextmanager
def attack(hostile: Callable[[], object]) -> Iterator[None]:
    """Run `hostile` over and over in a thread while the body runs (each call must raise
    grpc.RpcError: refused), then check that every one was refused."""
    stop = threading.Event()
    problems: list[str] = []
    counts = [0]

    def loop() -> None:
        while not stop.is_set():
            try:
                hostile()
                problems.append("a hostile call was answered")
            except grpc.RpcError:
                counts[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                problems.append(repr(exc))

    thread = threading.Thread(target=loop, name="hostile-client", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not problems, problems[:3]
    assert counts[0] > 0, "the hostile client made no call"


def stored_tasks(data_dir: pathlib.Path) -> int:
    """Rows in the server's task table (read from its SQLite file, WAL included)."""
    [path] = [p for p in data_dir.glob("*.sqlite3")]
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]


def ready_messages(broker_url: str, queue: str) -> int | None:
    """Messages waiting in the logical queue's RabbitMQ queue; None if RabbitMQ has no such
    queue (a refused name must never become one)."""
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        try:
            declared = connection.channel().queue_declare(topology.work_queue_name(queue), passive=True)
            return declared.method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 404, exc
            return None


def queued_messages(broker_url: str, queue: str) -> int:
    """Messages in the logical queue's RabbitMQ queue (0 if it was never declared)."""
    return ready_messages(broker_url, queue) or 0


def assert_nothing_stored(server, broker_url: str, queue: str) -> None:
    assert stored_tasks(server.data_dir) == 0, "a refused request left a task in the store"
    assert queued_messages(broker_url, queue) == 0, "a refused request left a message in RabbitMQ"
