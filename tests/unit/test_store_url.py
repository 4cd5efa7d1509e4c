"""server.store_url: which store a server runs on, and what a bad URL says."""
from __future__ import annotations

import asyncio

import pytest

from qm.config import load_config
from qm.errors import ConfigError
from qm.metrics import ServerMetrics
from qm.server.app import make_store
from qm.server.store import Store
from qm.server.store_pg import PgStore


def config_with(**server):
    return load_config(None, env={f"QM_SERVER__{key.upper()}": str(value) for key, value in server.items()})


def test_the_default_is_sqlite_in_the_data_dir(tmp_path):
    config = config_with()
    assert config.server.store_url == "" and config.server.store_pool_size == 10
    store = make_store(config, tmp_path / "server-x.sqlite3", "server-x", ServerMetrics())
    try:
        assert isinstance(store, Store) and store.path == str(tmp_path / "server-x.sqlite3")
    finally:
        asyncio.run(store.close())


def test_a_sqlite_url_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_with(store_url="sqlite:///tasks.db")
    store = make_store(config, tmp_path / "unused.sqlite3", "server-x", ServerMetrics())
    try:
        assert isinstance(store, Store) and store.path == "tasks.db"
        assert (tmp_path / "tasks.db").exists() and not (tmp_path / "unused.sqlite3").exists()
    finally:
        asyncio.run(store.close())


def test_a_postgresql_url_makes_a_shared_store_with_the_pool_size(tmp_path):
    url = "postgresql://qm:secret@db.example:5432/queuemaster"
    config = config_with(store_url=url, store_pool_size=3)
    store = make_store(config, tmp_path / "unused.sqlite3", "server-x", ServerMetrics())
    assert isinstance(store, PgStore)  # connected later, in ServerApp.start
    assert (store.url, store.server_id, store.pool_size) == (url, "server-x", 3)
    assert config.to_dict()["server"]["store_url"] == "postgresql://qm:***@db.example:5432/queuemaster"


@pytest.mark.parametrize("url", ["mysql://db/qm", "postgresql://", "postgresql://db.example", "sqlite:///",
                                 "sqlite://relative.db", "/var/lib/qm/tasks.db"])
def test_a_bad_store_url_names_the_key_and_the_forms(url):
    with pytest.raises(ConfigError) as refused:
        config_with(store_url=url)
    assert "server.store_url" in str(refused.value)
    assert "sqlite:///PATH" in str(refused.value) and "postgresql://USER@HOST:PORT/DATABASE" in str(refused.value)


def test_the_pool_size_must_be_positive():
    with pytest.raises(ConfigError, match="server.store_pool_size"):
        config_with(store_pool_size=0)
