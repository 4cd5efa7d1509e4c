"""Shared fixtures: a real RabbitMQ node for the tests that need one.

A machine without rabbitmq-server skips those tests locally, but under CI=true a missing
service is a failure, never a silent skip.
"""
from __future__ import annotations

import pytest

from qm.testing.rabbitmq import LocalRabbitMQ
from tests.requirements import require_rabbitmq

#: Directories whose tests start real processes, and those that are slow as a whole.
PROCESS_DIRS = {"integration", "e2e", "faults", "load", "observability", "cluster"}
SLOW_DIRS = {"faults", "load", "observability", "cluster"}
#: Fixtures that start (or need) a real RabbitMQ node.
RABBITMQ_FIXTURES = {"rabbitmq", "own_rabbitmq", "stack", "launcher", "rabbitmq_cluster", "cluster"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark tests by where they live and what they use, so `-m "not rabbitmq and not slow"`
    is the fast inner loop (see pyproject.toml)."""
    for item in items:
        parts = set(item.path.parts)
        if parts & PROCESS_DIRS:
            item.add_marker(pytest.mark.processes)
        if parts & SLOW_DIRS or item.path.name == "test_math_fuzz.py":
            item.add_marker(pytest.mark.slow)
        if parts & {"faults", "cluster"}:
            item.add_marker(pytest.mark.faults)
        if RABBITMQ_FIXTURES & set(getattr(item, "fixturenames", ())) or parts & PROCESS_DIRS:
            item.add_marker(pytest.mark.rabbitmq)
        if shares_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def shares_module_fixture(item) -> bool:
    """Whether the test uses a fixture set up once per module or class (a RabbitMQ cluster,
    a server pair): under pytest-xdist (`scripts/test` runs 3 workers, --dist loadgroup) such
    a module runs whole on one worker, in file order, which starts that fixture once."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info else ()
    return any(d[-1].scope in ("module", "class", "package") for d in defs if d)


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory) -> LocalRabbitMQ:
    """One RabbitMQ node for the whole session (tests use distinct queue names)."""
    require_rabbitmq()
    node = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def own_rabbitmq(tmp_path_factory) -> LocalRabbitMQ:
    """A private node for tests that stop, kill or restart the broker."""
    require_rabbitmq()
    node = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq-own"))
    node.start()
    yield node
    node.kill()


@pytest.fixture
def launcher(tmp_path):
    """Starts qm-server / qm-worker subprocesses for one test (tests/processes.py) and
    stops every one of them, and deletes the test's queues, in teardown."""
    from tests.processes import Launcher

    launcher = Launcher(tmp_path)
    yield launcher
    launcher.cleanup()


@pytest.fixture
def gates(tmp_path, launcher):
    """gates() → a new tests.processes.Gate in this test's directory. Every gate is opened
    in teardown, before the launcher stops the workers, so no gated task outlives its test
    (or holds up a worker's drain)."""
    from tests.processes import Gate

    made: list[Gate] = []

    def make(name: str | None = None) -> Gate:
        gate = Gate(tmp_path, name)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.open()


@pytest.fixture
def stack(rabbitmq, launcher):
    """A qm-server and one qm-worker (2 children) on a logical queue of this test's own,
    all on the shared RabbitMQ node; `stack.client` is a qm.Client of that server."""
    import types

    import qm

    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url)
    worker = launcher.worker(rabbitmq.url, procs=2, queues=queue)
    with qm.Client(server.address) as client:
        yield types.SimpleNamespace(server=server, worker=worker, queue=queue, client=client,
                                    broker_url=rabbitmq.url)
