"""What a test needs from the machine: a missing service skips a local run but fails
under CI=true, where everything must be installed by the setup."""
from __future__ import annotations

import os
from typing import NoReturn

import pytest

from qm.testing.rabbitmq import RabbitMQNotInstalled, find_server_script


def missing(reason: str) -> NoReturn:
    """Skip locally, fail in CI: a green CI must never hide an install step."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def require_rabbitmq() -> None:
    try:
        find_server_script()
    except RabbitMQNotInstalled as exc:
        missing(str(exc))
