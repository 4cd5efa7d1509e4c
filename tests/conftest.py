"""Shared fixtures: a real RabbitMQ node for the tests that need one.

A machine without rabbitmq-server skips those tests locally, but under CI=true a missing
service is a failure, never a silent skip.
"""
from __future__ import annotations

import os

import pytest

from qm.testing.rabbitmq import LocalRabbitMQ, RabbitMQNotInstalled, find_server_script


def _require_rabbitmq() -> None:
    try:
        find_server_script()
    except RabbitMQNotInstalled as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory) -> LocalRabbitMQ:
    """One RabbitMQ node for the whole session (tests use distinct queue names)."""
    _require_rabbitmq()
    node = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def own_rabbitmq(tmp_path_factory) -> LocalRabbitMQ:
    """A private node for tests that stop, kill or restart the broker."""
    _require_rabbitmq()
    node = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq-own"))
    node.start()
    yield node
    node.kill()
