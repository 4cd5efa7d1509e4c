"""qm.server.identity: the server id kept in the data directory, the upgrade path from
hostname-derived ids, and the lock that stops a second server on the same directory."""
from __future__ import annotations

import logging
import os
import re

import pytest

from qm.errors import DuplicateServer, ServerIdentityError
from qm.server import identity
from qm.server.identity import claim

HOST = "node-7"


@pytest.fixture
def claims():
    """claim() that releases every identity it handed out at the end of the test."""
    held: list[identity.ServerIdentity] = []

    def make(data_dir, configured_id: str = "", hostname: str = HOST) -> identity.ServerIdentity:
        held.append(claim(data_dir, configured_id, hostname))
        return held[-1]

    yield make
    for claimed in held:
        claimed.release()


def reclaim(claims, data_dir, configured_id: str = "", hostname: str = HOST) -> str:
    """The id a restarted server gets: the previous one has let go first."""
    first = claims(data_dir, configured_id, hostname)
    first.release()
    return first.server_id


def test_first_start_generates_an_id_and_records_it(claims, tmp_path):
    data_dir = tmp_path / "data"
    ident = claims(data_dir)

    assert re.fullmatch(rf"server-{HOST}-[0-9a-f]{{8}}", ident.server_id)
    assert (data_dir / identity.ID_FILE).read_text() == ident.server_id + "\n"
    assert ident.store_path == data_dir / f"{ident.server_id}.sqlite3"
    assert not list(data_dir.glob(".server-id.*")), "no temporary file left behind"


def test_later_starts_reuse_the_recorded_id(claims, tmp_path):
    first = reclaim(claims, tmp_path)
    second = reclaim(claims, tmp_path)
    assert second == first
    assert claims(tmp_path / "other").server_id != first  # another store: another id


def test_a_configured_id_wins_and_is_kept_by_a_new_data_dir(claims, tmp_path):
    assert reclaim(claims, tmp_path, configured_id="server-1") == "server-1"
    # Dropping the setting later keeps the id the directory ran under (and so its store).
    assert reclaim(claims, tmp_path) == "server-1"


def test_a_configured_id_other_than_the_recorded_one_is_used_and_warned_about(claims, tmp_path, caplog):
    recorded = reclaim(claims, tmp_path)

    with caplog.at_level(logging.WARNING, logger="qm.server.identity"):
        assert reclaim(claims, tmp_path, configured_id="renamed") == "renamed"

    assert recorded in caplog.text and "renamed" in caplog.text
    assert reclaim(claims, tmp_path) == recorded  # the directory still names its own id


def test_an_installation_from_before_ids_were_recorded_keeps_its_hostname_id(claims, tmp_path):
    (tmp_path / f"server-{HOST}.sqlite3").write_bytes(b"")  # the store of an earlier version

    assert reclaim(claims, tmp_path) == f"server-{HOST}"
    assert (tmp_path / identity.ID_FILE).read_text() == f"server-{HOST}\n"
    # Recorded now: a later hostname change (a recreated container) no longer changes it.
    assert reclaim(claims, tmp_path, hostname="renamed-host") == f"server-{HOST}"


def test_stores_of_other_hosts_are_not_adopted_but_named_in_a_warning(claims, tmp_path, caplog):
    (tmp_path / "server-old-host.sqlite3").write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="qm.server.identity"):
        server_id = reclaim(claims, tmp_path)

    assert server_id.startswith(f"server-{HOST}-")
    assert "server-old-host" in caplog.text and "server.id" in caplog.text


def test_a_hostname_with_odd_characters_gives_a_usable_id(claims, tmp_path):
    server_id = reclaim(claims, tmp_path, hostname="my host/1")
    assert server_id.startswith("server-my-host-1-")


def test_a_second_server_on_the_same_data_dir_is_refused_naming_dir_and_pid(claims, tmp_path):
    data_dir = tmp_path / "shared"
    first = claims(data_dir)

    with pytest.raises(DuplicateServer) as refused:
        claim(data_dir)

    message = str(refused.value)
    assert str(data_dir) in message and f"pid {os.getpid()}" in message
    assert "--data-dir" in message
    first.release()
    assert reclaim(claims, data_dir) == first.server_id  # free again once the first let go


@pytest.mark.parametrize("content, why", [("", "it is empty"), ("a/b\n", "no '/'")])
def test_an_unusable_id_file_is_an_error_naming_the_file(tmp_path, content, why):
    (tmp_path / identity.ID_FILE).write_text(content)

    with pytest.raises(ServerIdentityError) as raised:
        claim(tmp_path, hostname=HOST)

    assert str(tmp_path / identity.ID_FILE) in str(raised.value) and why in str(raised.value)
    claim(tmp_path, configured_id="x", hostname=HOST).release()  # the lock was let go


def test_an_unusable_data_dir_is_an_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(ServerIdentityError) as raised:
        claim(blocker / "data")

    assert str(blocker / "data") in str(raised.value) and "server.data_dir" in str(raised.value)
