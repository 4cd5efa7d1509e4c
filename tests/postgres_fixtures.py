"""PostgreSQL fixtures, imported by the test modules (and conftests) that use them.

`postgres`: one private server (qm.testing.postgres) for a whole session, started on
first use; a test makes its own database with `fresh_database(postgres)`, so tests share
the server and never each other's rows. `own_postgres`: a server of the test's own, for
tests that stop, kill or restart it. Without PostgreSQL installed these skip locally and
fail under CI=true (tests/requirements.py).
"""
from __future__ import annotations

import uuid

import pytest

from qm.testing.postgres import LocalPostgres, PostgresNotInstalled, find_bin_dir
from tests.requirements import missing


def require_postgres() -> None:
    try:
        find_bin_dir()
    except PostgresNotInstalled as exc:
        missing(str(exc))


def fresh_database(server: LocalPostgres) -> str:
    """A new, empty database on `server`; its URL."""
    return server.create_database(f"qm_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> LocalPostgres:
    require_postgres()
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def own_postgres(tmp_path_factory) -> LocalPostgres:
    require_postgres()
    server = LocalPostgres(tmp_path_factory.mktemp("postgres-own"))
    server.start()
    yield server
    server.cleanup()
