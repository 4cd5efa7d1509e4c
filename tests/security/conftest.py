"""Fixtures of the hostile-client suite: certificates (openssl CLI) and a tokens file."""
from __future__ import annotations

import shutil

import pytest

from tests.security.support import Certificates, Tokens, make_certificates, make_tokens


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    """A CA with server and client certificates, and another CA with a client of its own."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates (apt-get install openssl)")
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tokens(tmp_path) -> Tokens:
    """A tokens file with one token per role: read, submit, admin."""
    return make_tokens(tmp_path / "tokens.json")
