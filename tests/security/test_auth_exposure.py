"""Who may start where: off loopback, qm-server and the worker status endpoint need TLS and
auth, or an explicit insecure switch. Config only, no network."""
from __future__ import annotations

import pytest

from qm.config import load_config
from qm.errors import ConfigError
from qm.security.tokens import TokenFile
from qm.server.app import check_exposure
from qm.worker.status import StatusEndpoint
from tests.unit.aio import run


@pytest.fixture
def tls_env(certs, tmp_path):
    tokens = tmp_path / "tokens.json"
    TokenFile(str(tokens)).create("admin", "operator")
    return {"QM_SERVER__TLS_CERT": str(certs.server.cert), "QM_SERVER__TLS_KEY": str(certs.server.key),
            "QM_SERVER__TOKENS_FILE": str(tokens)}


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "localhost:0", "[::1]:50051"])
def test_loopback_may_go_without_tls_and_auth(listen):
    tls, authenticator = check_exposure(load_config(env={"QM_SERVER__LISTEN": listen}))
    assert tls is None and not authenticator.enabled


@pytest.mark.parametrize("drop, missing", [
    (("QM_SERVER__TLS_CERT", "QM_SERVER__TLS_KEY", "QM_SERVER__TOKENS_FILE"), "TLS (--tls-cert, --tls-key) and auth"),
    (("QM_SERVER__TLS_CERT", "QM_SERVER__TLS_KEY"), "TLS (--tls-cert, --tls-key) is off"),
    (("QM_SERVER__TOKENS_FILE",), "auth (--tokens-file) is off"),
])
def test_off_loopback_needs_tls_and_auth_or_insecure(tls_env, drop, missing):
    env = {key: value for key, value in tls_env.items() if key not in drop} | {"QM_SERVER__LISTEN": "0.0.0.0:50051"}
    with pytest.raises(ConfigError) as refused:
        check_exposure(load_config(env=env))
    assert refused.value.path == "server.listen"
    assert missing in str(refused.value) and "--insecure" in str(refused.value)
    tls, authenticator = check_exposure(load_config(env=env | {"QM_SERVER__INSECURE": "true"}))
    assert (tls is not None, authenticator.enabled) == ("QM_SERVER__TLS_CERT" in env, "QM_SERVER__TOKENS_FILE" in env)


def test_off_loopback_with_tls_and_tokens_starts(tls_env):
    tls, authenticator = check_exposure(load_config(env=tls_env | {"QM_SERVER__LISTEN": "0.0.0.0:50051"}))
    assert tls is not None and authenticator.enabled


def test_certificate_roles_need_mtls_and_a_missing_tokens_file_names_its_key(tls_env, tmp_path):
    with pytest.raises(ConfigError) as roles:
        check_exposure(load_config(env=tls_env | {"QM_SERVER__CLIENT_CERT_ROLES": "ci:submit"}))
    assert roles.value.path == "server.client_cert_roles"
    with pytest.raises(ConfigError) as tokens:
        check_exposure(load_config(env={"QM_SERVER__TOKENS_FILE": str(tmp_path / "absent.json")}))
    assert tokens.value.path == "server.tokens_file" and "qm token create" in str(tokens.value)


def test_the_worker_status_endpoint_off_loopback_needs_tls_and_tokens_or_status_insecure():
    exposed = {"QM_WORKER__STATUS_LISTEN": "0.0.0.0:0"}

    async def build(env: dict[str, str]) -> StatusEndpoint:  # grpc.aio objects want a loop
        return StatusEndpoint.from_config(None, load_config(env=env).worker)  # type: ignore[arg-type]

    with pytest.raises(ConfigError) as refused:
        run(build, exposed)
    assert refused.value.path == "worker.status_listen"
    assert run(build, exposed | {"QM_WORKER__STATUS_INSECURE": "1"}).tls is None
