"""What a test needs from the machine: a missing service skips a local run but fails
under CI=true, where everything must be installed by the setup."""
from __future__ import annotations

import os
import pathlib
import shutil
from typing import NoReturn

import pytest

from qm.testing.rabbitmq import RabbitMQNotInstalled, find_server_script

#: The Node.js tools of the API checks (package.json; node_modules from scripts/setup --test).
NODE_TOOLS = pathlib.Path(__file__).resolve().parent.parent / "tools" / "node"


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


def require_node() -> str:
    """The node command, with tools/node's packages installed; returns its path."""
    node = shutil.which("node")
    if node is None:
        missing("node is not installed (scripts/setup --test installs nodejs and npm with apt)")
    if not (NODE_TOOLS / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing(f"{NODE_TOOLS / 'node_modules'} lacks @grpc/grpc-js; run scripts/setup --test")
    return node
