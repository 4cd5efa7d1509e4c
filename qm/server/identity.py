"""Who this qm-server is: a server id kept with its store, and a lock on its data directory.

The server id names the server's durable RabbitMQ queues (`qm.events.<id>`,
`qm.dead.<id>`, `qm.heartbeats.<id>`) and its SQLite file (`<id>.sqlite3`). Two live
servers under one id consume the same events queue, so each store gets about half of the
events and tasks stay QUEUED or RUNNING forever (issue #15). Hence:

    claim(data_dir, configured_id)
      1. lock      <data_dir>/server.lock  (fcntl.flock, held for the process lifetime;
                   the holder's pid and host written in it) → DuplicateServer if taken
      2. resolve   server.id if set
                   else the id recorded in <data_dir>/server-id
                   else server-<hostname> if <data_dir>/server-<hostname>.sqlite3 exists
                        (an installation from before ids were recorded: keep its store
                        and its durable queues)
                   else a new server-<hostname>-<8 hex digits>
      3. record    the first id a data directory runs under goes into <data_dir>/server-id
                   (written atomically), so later starts reuse it

The lock only sees servers sharing the directory on one host; two servers given the same
id from different directories (or hosts) are refused by RabbitMQ instead: the server
consumes its events queue as an exclusive consumer (see qm.server.app).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import pathlib
import re
import secrets
import socket

from qm.config import check_server_id
from qm.errors import DuplicateServer, ServerIdentityError

log = logging.getLogger(__name__)

#: The file in the data directory that records the server id.
ID_FILE = "server-id"
#: The file in the data directory that a running server holds an exclusive flock on.
LOCK_FILE = "server.lock"
#: Random hex digits that make a generated id unique among servers sharing a hostname.
ID_SUFFIX_BYTES = 4
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_.-]")


@dataclasses.dataclass
class ServerIdentity:
    """A claimed identity: keep it for the server's lifetime, `release()` when stopping."""

    server_id: str
    data_dir: pathlib.Path
    lock_fd: int

    @property
    def store_path(self) -> pathlib.Path:
        return self.data_dir / f"{self.server_id}.sqlite3"

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing the only descriptor releases the flock
            self.lock_fd = -1


def claim(data_dir: str | os.PathLike, configured_id: str = "", hostname: str | None = None) -> ServerIdentity:
    """Lock `data_dir` for this process and settle the server id (see the module docstring).

    Raises DuplicateServer if another live server holds the directory, and
    ServerIdentityError if the directory or its id file cannot be used.
    """
    directory = pathlib.Path(data_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:  # made by an older version, or by hand
            log.warning("data directory %s was open to other users; now 0700 (owner only)", directory)
            directory.chmod(0o700)
    except OSError as exc:
        raise ServerIdentityError(
            f"cannot create the data directory {directory} (server.data_dir): {exc.strerror or exc}"
        ) from None
    lock_fd = _lock(directory)
    try:
        server_id = _resolve(directory, configured_id, hostname or socket.gethostname())
    except BaseException:
        os.close(lock_fd)
        raise
    return ServerIdentity(server_id, directory, lock_fd)


def recorded_id(data_dir: pathlib.Path) -> str | None:
    """The id recorded in the data directory, None if there is none yet."""
    path = data_dir / ID_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ServerIdentityError(f"cannot read the server id from {path}: {exc}") from None
    server_id = text.strip()
    try:
        check_server_id(server_id)
    except ValueError as exc:
        raise _unusable_id_file(path, str(exc)) from None
    if not server_id:
        raise _unusable_id_file(path, "it is empty")
    return server_id


def _unusable_id_file(path: pathlib.Path, why: str) -> ServerIdentityError:
    return ServerIdentityError(
        f"{path} holds no usable server id ({why}); write this server's id into it (the name of its "
        f"<id>.sqlite3 store in {path.parent}), or set server.id"
    )


# -- the lock ---------------------------------------------------------------------------


def _lock(directory: pathlib.Path) -> int:
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ServerIdentityError(
            f"cannot open the lock file {path}: {exc.strerror or exc}; "
            "check the permissions of the data directory (server.data_dir)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ServerIdentityError(f"cannot lock {path}: {exc.strerror or exc}") from None
        raise DuplicateServer(
            f"another live qm-server already uses the data directory {directory} ({holder} holds the lock "
            f"{path}); give each server its own --data-dir (server.data_dir)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it (it may not have written it yet)."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not yet written its pid"


# -- the id -----------------------------------------------------------------------------


def _resolve(directory: pathlib.Path, configured_id: str, hostname: str) -> str:
    if configured_id:
        try:
            recorded = recorded_id(directory)
        except ServerIdentityError as exc:  # not needed now; left for the user to inspect
            log.warning("%s; using server.id %s", exc, configured_id)
            return configured_id
        if recorded is None:
            _record(directory, configured_id)
        elif recorded != configured_id:
            log.warning(
                "server.id %s differs from the id %s recorded in %s: this run uses %s (store "
                "%s.sqlite3, queue qm.events.%s); without server.id the server is %s again",
                configured_id,
                recorded,
                directory / ID_FILE,
                configured_id,
                configured_id,
                configured_id,
                recorded,
            )
        return configured_id
    recorded = recorded_id(directory)
    if recorded is not None:
        return recorded
    legacy = f"server-{hostname}"
    if (directory / f"{legacy}.sqlite3").exists():
        log.info(
            "data directory %s holds %s.sqlite3 from before server ids were recorded: keeping the id %s",
            directory,
            legacy,
            legacy,
        )
        server_id = legacy
    else:
        server_id = f"server-{_NOT_IN_ID.sub('-', hostname)}-{secrets.token_hex(ID_SUFFIX_BYTES)}"
        _warn_of_other_stores(directory, server_id)
        log.info("new server id %s, recorded in %s", server_id, directory / ID_FILE)
    _record(directory, server_id)
    return server_id


def _warn_of_other_stores(directory: pathlib.Path, server_id: str) -> None:
    """Stores of other ids in the directory (e.g. from before the hostname changed) are
    not used: say so, since their tasks will not show."""
    others = sorted(path.stem for path in directory.glob("*.sqlite3"))
    if others:
        log.warning(
            "data directory %s holds the stores of server ids %s, which this server (new id %s) "
            "does not use; to keep using one, set server.id to its id",
            directory,
            ", ".join(others),
            server_id,
        )


def _record(directory: pathlib.Path, server_id: str) -> None:
    """Write the id file atomically: a temporary file, fsync, rename, fsync the directory."""
    path = directory / ID_FILE
    temporary = directory / f".{ID_FILE}.{os.getpid()}.tmp"
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as stream:
            stream.write(server_id + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except OSError as exc:
        raise ServerIdentityError(f"cannot record the server id in {path}: {exc.strerror or exc}") from None
