"""Signatures, tokens and secret settings without a network: what a forged, altered,
expired, replayed or unknown-key blob gets; what the tokens file holds; which settings
stop a start."""
from __future__ import annotations

import json
import os
import stat

import pytest

from qm.config import load_config, scrub_secret_env
from qm.errors import ConfigError
from qm.security.signing import Keyring, ReplayGuard, SignatureError
from qm.security.tokens import TokenFile, lookup, role_allows

SECRET = "a-secret-of-the-unit-tests-0123456789"
OTHER = "another-secret-of-the-unit-tests-987654"


def test_a_signature_verifies_under_its_key_and_nothing_else():
    keys = Keyring("2", {"1": OTHER, "2": SECRET})
    blob = keys.sign(b"data", ttl_s=60)
    signed = keys.verify(blob)
    assert (signed.data, signed.key_id) == (b"data", "2")
    assert keys.verify(Keyring("1", {"1": OTHER}).sign(b"old", 60)).key_id == "1"  # rotation: old id accepted

    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SignatureError, match="does not match key id '2'"):
        keys.verify(altered)
    with pytest.raises(SignatureError, match="key id '9'"):
        keys.verify(Keyring("9", {"9": SECRET}).sign(b"data", 60))
    with pytest.raises(SignatureError, match="does not match"):
        keys.verify(Keyring("2", {"2": OTHER}).sign(b"data", 60))
    with pytest.raises(SignatureError, match="not a signed"):
        keys.verify(b"qm1" + b"\0" * 40)


def test_an_expired_signature_is_refused_at_submit_but_read_later_without_expiry():
    keys = Keyring("1", {"1": SECRET})
    late = keys.sign(b"data", ttl_s=-1)
    with pytest.raises(SignatureError, match="expired"):
        keys.verify(late)
    assert keys.verify(late, check_expiry=False).data == b"data"  # workers and result readers


def test_the_replay_guard_accepts_each_nonce_once():
    keys, guard = Keyring("1", {"1": SECRET}), ReplayGuard()
    blob = keys.sign(b"data", 60)
    guard.check(keys.verify(blob))
    guard.check(keys.verify(keys.sign(b"data", 60)))  # the same data signed again: a new nonce
    with pytest.raises(SignatureError, match="replay"):
        guard.check(keys.verify(blob))


def test_the_replay_guard_forgets_nonces_once_they_expire():
    """Memory is bounded by what is still valid, however many payloads a server has seen."""
    keys, guard = Keyring("1", {"1": SECRET}), ReplayGuard()
    valid = keys.verify(keys.sign(b"new", 60))
    guard.check(valid)
    for _ in range(2000):  # signed long ago: past their expiry (workers read them without the check)
        guard.check(keys.verify(keys.sign(b"old", ttl_s=-1), check_expiry=False))
    assert len(guard) == 2  # the valid nonce and the last expired one, not 2,001
    with pytest.raises(SignatureError, match="replay"):
        guard.check(valid)


def test_a_submission_retried_under_its_idempotency_key_is_not_a_replay():
    keys, guard = Keyring("1", {"1": SECRET}), ReplayGuard()
    signed = keys.verify(keys.sign(b"data", 60))
    guard.check(signed, key="k1")
    guard.check(signed, key="k1")  # the client's retry after UNAVAILABLE: same key
    for other in ("k2", ""):
        with pytest.raises(SignatureError, match="replay"):
            guard.check(signed, key=other)


def test_tokens_are_stored_hashed_0600_and_expire_or_get_revoked(tmp_path):
    path = tmp_path / "tokens.json"
    tokens = TokenFile(str(path))
    token = tokens.create("submit", "ci")
    short = tokens.create("read", "brief", ttl_s=-1)
    assert token not in path.read_text() and json.loads(path.read_text())["version"] == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = tokens.read()
    assert lookup(entries, token).entry.role == "submit" and lookup(entries, token).problem is None
    assert "expired" in lookup(entries, short).problem
    assert lookup(entries, "qm_nope").entry is None
    with pytest.raises(ValueError, match="already exists"):
        tokens.create("admin", "ci")
    tokens.revoke("ci")
    assert "revoked" in lookup(tokens.read(), token).problem
    assert role_allows("admin", "submit") and role_allows("submit", "read") and not role_allows("read", "submit")


@pytest.mark.parametrize("env, key", [
    ({"QM_EXECUTOR__SECRET": "short"}, "executor.secret"),
    ({"QM_EXECUTOR__PREVIOUS_SECRETS": "no-colon"}, "executor.previous_secrets"),
    ({"QM_EXECUTOR__PREVIOUS_SECRETS": "1:short"}, "executor.previous_secrets"),
    ({"QM_EXECUTOR__KEY_ID": "has space"}, "executor.key_id"),
    ({"QM_SERVER__CLIENT_CERT_ROLES": "ci:root"}, "server.client_cert_roles"),
])
def test_bad_secret_and_role_settings_stop_the_start_naming_the_key(env, key):
    with pytest.raises(ConfigError) as error:
        load_config(env=env)
    assert error.value.path == key


def test_secret_bearing_variables_are_dropped_from_the_environment():
    environ = {"QM_EXECUTOR__SECRET": SECRET, "QM_BROKER__URL": "amqp://u:p@h/", "QM_CLIENT__TOKEN": "qm_x",
               "QM_BROKER__PASSWORD_FILE": "/run/pw", "QM_WORKER__PROCS": "2", "PATH": "/bin"}
    dropped = scrub_secret_env(environ)
    assert sorted(environ) == ["PATH", "QM_WORKER__PROCS"] and len(dropped) == 4
    assert load_config(env={"QM_CLIENT__TOKEN": "qm_x"}).to_dict()["client"]["token"] == "***"


def test_the_executor_secret_and_the_broker_password_can_come_from_files(tmp_path):
    from qm.security.amqp import broker_urls

    secret_file, password_file = tmp_path / "executor-secret", tmp_path / "rabbitmq-password"
    secret_file.write_text(SECRET + "\n")
    password_file.write_text("p@ss/word\n")
    config = load_config(env={"QM_EXECUTOR__SECRET_FILE": str(secret_file), "QM_EXECUTOR__KEY_ID": "7",
                              "QM_BROKER__URL": "amqp://qm@rabbit:5672/qm",
                              "QM_BROKER__PASSWORD_FILE": str(password_file)})
    keys = Keyring.from_config(config.executor)
    assert keys is not None and keys.verify(Keyring("7", {"7": SECRET}).sign(b"x", 60)).key_id == "7"
    assert broker_urls(config.broker) == ["amqp://qm:p%40ss%2Fword@rabbit:5672/qm"]

    secret_file.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 32"):
        Keyring.from_config(config.executor)
    with pytest.raises(ConfigError) as missing:
        broker_urls(load_config(env={"QM_BROKER__PASSWORD_FILE": str(tmp_path / "nope")}).broker)
    assert missing.value.path == "broker.password_file"
