"""Bearer tokens with roles, kept hashed in a JSON tokens file (`server.tokens_file`).

A token is `qm_` + 43 URL-safe characters (32 random bytes from `secrets`); it is shown
once, by `qm token create`, and only its SHA-256 is stored. The file (created 0600):

    {"version": 1,
     "tokens": [{"name": "ci", "role": "submit", "sha256": "<64 hex digits>",
                 "created_at": "2026-12-02T02:00:00+00:00", "expires_at": null,
                 "revoked_at": null}]}

Roles, each including the ones before it: `read` (status, stream, list types and
workers, reflection), `submit` (+ submit and cancel), `admin` (+ dead letters, requeue,
purge).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from typing import Any

from qm.errors import ConfigError

#: Roles from least to most rights; a role has the rights of every role before it.
ROLES = ("read", "submit", "admin")
#: What every token starts with, so a leaked one is recognisable (secret scanners).
TOKEN_PREFIX = "qm_"
#: Random bytes per token (256 bits: a SHA-256 of it needs no salt or slow hash).
TOKEN_BYTES = 32
FILE_VERSION = 1


def role_allows(role: str, needed: str) -> bool:
    """True when `role` has the rights of `needed`."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _parse_time(value: Any) -> datetime.datetime | None:
    return None if value is None else datetime.datetime.fromisoformat(value)


@dataclasses.dataclass(frozen=True)
class TokenEntry:
    """One stored token: its name, role and hash, never the token itself."""

    name: str
    role: str
    sha256: str
    created_at: datetime.datetime
    expires_at: datetime.datetime | None = None
    revoked_at: datetime.datetime | None = None

    def problem(self, now: datetime.datetime) -> str | None:
        """Why this token no longer works, or None."""
        if self.revoked_at is not None:
            return f"token {self.name!r} was revoked at {self.revoked_at.isoformat()}"
        if self.expires_at is not None and now >= self.expires_at:
            return f"token {self.name!r} expired at {self.expires_at.isoformat()}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }

    @classmethod
    def from_json(cls, item: Any) -> "TokenEntry":
        if not isinstance(item, dict):
            raise ValueError(f"expected an object per token, got {item!r}")
        role, digest = item.get("role"), item.get("sha256")
        if role not in ROLES:
            raise ValueError(f"token {item.get('name')!r} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"token {item.get('name')!r} has no sha256 of 64 hex digits")
        return cls(
            str(item["name"]),
            role,
            digest.lower(),
            datetime.datetime.fromisoformat(item["created_at"]),
            _parse_time(item.get("expires_at")),
            _parse_time(item.get("revoked_at")),
        )


class TokenFile:
    """A tokens file: read, look a token up, and (for `qm token`) add or revoke entries."""

    def __init__(self, path: str, key: str = "server.tokens_file") -> None:
        self.path = path
        self.key = key

    def read(self, missing_ok: bool = False) -> list[TokenEntry]:
        try:
            with open(self.path, encoding="utf-8") as stream:
                data = json.load(stream)
        except FileNotFoundError:
            if missing_ok:
                return []
            raise ConfigError(
                self.key,
                f"tokens file {self.path!r} not found; create it with "
                f"`qm token create --tokens-file {self.path} --role admin`",
            ) from None
        except OSError as exc:
            raise ConfigError(self.key, f"cannot read tokens file {self.path!r}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(self.key, f"tokens file {self.path!r} is not valid JSON: {exc}") from None
        try:
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError(f'expected an object with "version": {FILE_VERSION}')
            return [TokenEntry.from_json(item) for item in data.get("tokens", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(self.key, f"tokens file {self.path!r}: {exc}") from None

    def write(self, entries: list[TokenEntry]) -> None:
        """Replace the file atomically; created 0600 (it holds hashes, but still)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        handle, temp = tempfile.mkstemp(prefix=".tokens-", dir=directory)  # mkstemp creates 0600
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump({"version": FILE_VERSION, "tokens": [e.to_json() for e in entries]}, stream, indent=2)
                stream.write("\n")
            os.replace(temp, self.path)
        except BaseException:
            os.unlink(temp)
            raise

    def create(self, role: str, name: str, ttl_s: float | None = None) -> str:
        """Add a token; return it (the only time it exists in clear)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        entries = self.read(missing_ok=True)
        if any(entry.name == name for entry in entries):
            raise ValueError(f"a token named {name!r} already exists in {self.path}; pick another --name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        now = _now()
        expires = now + datetime.timedelta(seconds=ttl_s) if ttl_s else None
        self.write(entries + [TokenEntry(name, role, token_hash(token), now, expires)])
        return token

    def revoke(self, name: str) -> TokenEntry:
        entries = self.read()
        for index, entry in enumerate(entries):
            if entry.name == name:
                entries[index] = dataclasses.replace(entry, revoked_at=entry.revoked_at or _now())
                self.write(entries)
                return entries[index]
        raise ValueError(f"no token named {name!r} in {self.path}")


@dataclasses.dataclass(frozen=True)
class Match:
    """The outcome of looking a presented token up."""

    entry: TokenEntry | None
    problem: str | None = None


def lookup(entries: list[TokenEntry], token: str, now: datetime.datetime | None = None) -> Match:
    """The entry whose hash matches `token` (compared in constant time against every entry)."""
    digest = token_hash(token)
    found = None
    for entry in entries:
        if hmac.compare_digest(entry.sha256, digest):
            found = entry
    if found is None:
        return Match(None, "the token is not known to this server (wrong token, or another server's tokens file)")
    return Match(found, found.problem(now or _now()))
