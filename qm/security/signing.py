"""Signed blobs of qm.Executor: HMAC-SHA256 under a key id, with an expiry and a nonce.

Wire format (all integers big-endian):

    b"qm2" | key id length (1 byte) | key id | expires_at_ms (8) | nonce (16)
          | HMAC-SHA256(secret of key id, everything before it + data) (32) | data

Rotation: a Keyring signs with its current key and accepts every key it holds, so servers
and workers first learn the new secret (as current, the old one under
executor.previous_secrets), then clients move over, then the old id is dropped. A worker
signs a result under the key id of its payload, so a client not yet moved can read it.
Replay: the server refuses a payload past its expiry, and one whose nonce it has seen
before (ReplayGuard, kept until the expiry). A worker checks the signature only: a task
may wait in its queue longer than the submit window.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import heapq
import hmac
import secrets
import struct
import threading
import time

from qm.errors import ConfigError, ValidationError

MAGIC = b"qm2"
NONCE_BYTES = 16
DIGEST_BYTES = 32
_HEADER_TAIL = struct.Struct(">Q16s")  # expires_at_ms, nonce
#: The idempotency key of the submission being validated (set by qm-server around a
#: task type's validator): a submit retried under its key is not a replay.
SUBMISSION_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("qm_submission_key", default="")


class SignatureError(ValidationError):
    """A payload or result is unsigned, signed with an unknown key, expired or replayed."""


@dataclasses.dataclass(frozen=True)
class Signed:
    """A verified blob: its data and what the signature covered."""

    data: bytes
    key_id: str
    expires_at_ms: int
    nonce: bytes


@dataclasses.dataclass(frozen=True)
class Keyring:
    """The secrets by key id; `current` signs, all of them verify."""

    current: str
    secrets: dict[str, str]

    @classmethod
    def from_config(cls, executor) -> "Keyring | None":
        """From the executor config section; None when no secret is set (type disabled)."""
        secret = executor.secret
        if executor.secret_file:
            from qm.config import MIN_SECRET_LENGTH, read_secret_file

            secret = read_secret_file(executor.secret_file, "executor.secret_file")
            if len(secret) < MIN_SECRET_LENGTH:
                raise ConfigError(
                    "executor.secret_file",
                    f"the secret must be at least {MIN_SECRET_LENGTH} characters, got {len(secret)}",
                )
        if not secret:
            return None
        keys = dict(item.partition(":")[::2] for item in executor.previous_secrets)
        keys[executor.key_id] = secret
        return cls(executor.key_id, keys)

    def sign(self, data: bytes, ttl_s: float, key_id: str | None = None) -> bytes:
        """Signed under `key_id` (default: the current key; a worker answers under the key
        the payload came with, so a client not yet rotated can read its result)."""
        key_id = key_id or self.current
        name = key_id.encode()
        header = (
            MAGIC
            + bytes([len(name)])
            + name
            + _HEADER_TAIL.pack(int((time.time() + ttl_s) * 1000), secrets.token_bytes(NONCE_BYTES))
        )
        return header + self._mac(key_id, header, data) + data

    def verify(self, blob: bytes, what: str = "payload", check_expiry: bool = True) -> Signed:
        """The signed data, or SignatureError naming what is wrong."""
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
            raise SignatureError(
                what, "not a signed qm.Executor blob (unsigned, corrupted, or from a client older than the qm2 format)"
            )
        id_end = len(MAGIC) + 1 + blob[len(MAGIC)]
        header_end = id_end + _HEADER_TAIL.size
        if len(blob) < header_end + DIGEST_BYTES:
            raise SignatureError(what, "truncated signature")
        key_id = blob[len(MAGIC) + 1 : id_end].decode(errors="replace")
        expires_at_ms, nonce = _HEADER_TAIL.unpack(blob[id_end:header_end])
        digest, data = blob[header_end : header_end + DIGEST_BYTES], blob[header_end + DIGEST_BYTES :]
        if key_id not in self.secrets:
            raise SignatureError(
                what,
                f"signed with key id {key_id!r}, which this side does not hold (known: "
                f"{', '.join(sorted(self.secrets))}); rotate executor.key_id everywhere",
            )
        if not hmac.compare_digest(digest, self._mac(key_id, blob[:header_end], data)):
            raise SignatureError(
                what, f"signature does not match key id {key_id!r}: signed with another executor.secret, or altered"
            )
        if check_expiry and expires_at_ms < time.time() * 1000:
            raise SignatureError(
                what,
                "the signature has expired (executor.signature_ttl_s): sign again; a "
                "captured payload is not accepted forever",
            )
        return Signed(data, key_id, expires_at_ms, nonce)

    def _mac(self, key_id: str, header: bytes, data: bytes) -> bytes:
        mac = hmac.new(self.secrets[key_id].encode(), header, hashlib.sha256)
        mac.update(data)
        return mac.digest()


class ReplayGuard:
    """Nonces seen until their expiry: a signed payload is accepted for one submission.

    The same submission retried (the same idempotency key, e.g. after the broker was
    unavailable) passes; under another key, or none, it is a replay. A replay under the
    same key is harmless: the server answers it with the task of that key."""

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[int, str]] = {}  # nonce -> (expires_at_ms, idempotency key)
        self._expiries: list[tuple[int, bytes]] = []  # heap of (expires_at_ms, nonce): forgotten in order
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Nonces remembered: only those not yet expired once the next check has run."""
        return len(self._seen)

    def check(self, signed: Signed, what: str = "payload", key: str | None = None) -> None:
        key = SUBMISSION_KEY.get() if key is None else key
        now_ms = time.time() * 1000
        with self._lock:
            while self._expiries and self._expiries[0][0] < now_ms:  # only the expired: O(log n) each
                self._seen.pop(heapq.heappop(self._expiries)[1], None)
            first = self._seen.get(signed.nonce)
            if first is not None and not (key and first[1] == key):
                raise SignatureError(
                    what, "this signed payload was submitted before (replay); qm.Executor signs every call afresh"
                )
            if first is None:
                heapq.heappush(self._expiries, (signed.expires_at_ms, signed.nonce))
            self._seen[signed.nonce] = (signed.expires_at_ms, key)
