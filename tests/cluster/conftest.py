"""A real 3-node RabbitMQ cluster (qm.testing.rabbitmq_cluster), started once per module:
forming it takes tens of seconds on a loaded machine. Tests that stop or kill a node get
the cluster back whole before the next one (`cluster`), so each starts from 3 running
nodes. Each scenario prints its counts as "[faults] ..." lines (`pytest -rA` shows them)."""
from __future__ import annotations

import pytest

from qm.testing.rabbitmq_cluster import LocalRabbitMQCluster
from tests.requirements import require_rabbitmq

#: Bound on forming the cluster, and on a stopped or killed node rejoining it.
CLUSTER_START_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def rabbitmq_cluster(tmp_path_factory) -> LocalRabbitMQCluster:
    """Three RabbitMQ nodes joined as one cluster for the whole module."""
    require_rabbitmq()
    cluster = LocalRabbitMQCluster(tmp_path_factory.mktemp("rabbitmq-cluster"))
    cluster.start(CLUSTER_START_TIMEOUT_S)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(rabbitmq_cluster) -> LocalRabbitMQCluster:
    """The module's cluster with every node running: a node an earlier test stopped or
    killed is started again and has rejoined. (Not after the test: the last one's node
    would be started only to be stopped with the cluster.) nodes[0] is the one tests take
    away; nodes[1] stays up, for clean-up."""
    _restore(rabbitmq_cluster)
    return rabbitmq_cluster


def _restore(cluster: LocalRabbitMQCluster) -> None:
    down = [node for node in cluster.nodes if node.process is None or node.process.poll() is not None]
    for node in down:
        node.process = None
        node.start(CLUSTER_START_TIMEOUT_S)
    if down:
        cluster.wait_running(CLUSTER_START_TIMEOUT_S)
