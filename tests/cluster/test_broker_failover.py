"""The RabbitMQ node everyone is connected to goes away mid-run, on a 3-node cluster.

Two qm-servers sharing one PostgreSQL store (qm.testing.postgres; events applied once per
store) and two qm-workers are given the three nodes' URLs in the same order, so all of
them connect to the first node. Clients submit to both servers; once tasks are flowing, a
second wave of submissions starts and the first node is stopped gracefully (SIGTERM: what
`rabbitmqctl stop` does) or SIGKILLed. Nothing is restarted: every process must move to
another node by itself, and every accepted task, of both waves, must reach exactly one
terminal state with the right result (quorum work queues with 3 members, quorum server
queues: broker.quorum_initial_group_size and broker.server_queue_type). Counts are printed
as the fault suite prints them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import uuid

import pytest

import qm
from qm.broker.base import publish_until_confirmed
from qm.broker.rabbitmq import RabbitMQBroker
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
    Spec,
    Watcher,
    check_and_report,
    mixed_workload,
    statuses,
    submit_all,
    tails,
    wait_settled,
)
from tests.postgres_fixtures import fresh_database, postgres  # noqa: F401  (the fixture)
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.timeout(300)]

#: Tasks per server and wave (two servers, two waves).
TASKS_PER_WAVE = 40
#: Tasks finished before the node goes away: the fault hits a running workload.
FAULT_AFTER = 30
#: What every server and worker of the test runs with: the cluster's settings.
CLUSTER_ENV = {
    "QM_BROKER__RECONNECT_MAX_DELAY_S": "1",
    "QM_BROKER__QUORUM_INITIAL_GROUP_SIZE": "3",
    "QM_BROKER__SERVER_QUEUE_TYPE": "quorum",
}
#: Bound on every process being connected to another node after the fault.
FAILOVER_TIMEOUT_S = 60.0
#: Bound on one submit riding out the failover (the client retries under its key).
SUBMIT_RETRY_S = 90.0


#: A server's start-up line naming the PostgreSQL store it uses.
STORE_READY = re.compile(r"task store: PostgreSQL \S+ \(store id (?P<store_id>\S+),")


def last_connection(process) -> int:
    """Index of the process's latest "connected to" line: its node at the fault. A process
    may have moved off the first node before the fault (at its start, a stream replica on
    a node that just rejoined can still be missing); its failover is then behind it."""
    lines = process.stderr.split("\n")
    return max((i for i, line in enumerate(lines) if "connected to RabbitMQ at" in line), default=0)


def _connected_elsewhere(lost_port: int) -> re.Pattern:
    """The keeper's line on connecting to a node other than the lost one."""
    return re.compile(rf"connected to RabbitMQ at 127\.0\.0\.1:(?!{lost_port}\b)\d+")


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_the_connected_node_goes_away_mid_run(cluster, postgres, launcher, how, tmp_path):  # noqa: F811
    first = cluster.nodes[0]
    urls = ",".join(cluster.urls)  # everyone connects to the first node
    queue = launcher.queue(cluster.nodes[1].url)  # deleted in teardown through a node that stays up
    store_url = fresh_database(postgres)
    servers = [launcher.server(urls, env=CLUSTER_ENV, extra_args=["--store-url", store_url]) for _ in range(2)]
    store_ids = {server.wait_for_line(STORE_READY, 10.0)["store_id"] for server in servers}
    assert len(store_ids) == 1, f"two servers, one store: {store_ids}"
    workers = [launcher.worker(urls, procs=2, queues=queue, env=CLUSTER_ENV) for _ in range(2)]
    launcher.forget_queues(urls)  # deleted with the cluster (a node may be down in teardown)
    processes = [*servers, *workers]
    for process in processes:
        process.wait_for_line(rf"connected to RabbitMQ at 127\.0\.0\.1:{first.amqp_port}\b", 10.0)

    clients = [qm.Client(server.address, submit_retry_s=SUBMIT_RETRY_S) for server in servers]
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        try:
            def wave() -> list[dict[str, Spec]]:
                jobs = [pool.submit(submit_all, client, mixed_workload(TASKS_PER_WAVE), queue) for client in clients]
                return [job.result() for job in jobs]

            accepted = wave()  # per server: task id -> spec
            watchers = [Watcher(server.address, ids) for server, ids in zip(servers, accepted, strict=True)]
            wait_until(lambda: sum(w.terminal_count() for w in watchers) >= FAULT_AFTER, 60.0, interval_s=0.05,
                       message=f"{FAULT_AFTER} tasks finished before the fault")

            marks = {process: last_connection(process) for process in processes}
            second = [pool.submit(submit_all, client, mixed_workload(TASKS_PER_WAVE), queue) for client in clients]
            getattr(first, how)()  # stop(): graceful (SIGTERM); kill(): SIGKILL of the node
            finished_before_fault = sum(w.terminal_count() for w in watchers)
            for process in processes:
                process.wait_for_line(_connected_elsewhere(first.amqp_port), FAILOVER_TIMEOUT_S,
                                      start=marks[process])
            accepted_after = [job.result() for job in second]  # every submit answered: no client gave up
            later = [Watcher(server.address, ids) for server, ids in zip(servers, accepted_after, strict=True)]

            wait_settled(watchers + later, SETTLE_TIMEOUT_S, processes)
            final = {}
            for client, ids_before, ids_after in zip(clients, accepted, accepted_after, strict=True):
                final.update(statuses(client, [*ids_before, *ids_after]))
        finally:
            for client in clients:
                client.close()
            for process in processes:  # whole logs, for a failure's post-mortem
                (tmp_path / f"{process.name.replace(' ', '-')}.log").write_text(process.stderr)

    everything = {task_id: spec for wave_ids in [*accepted, *accepted_after] for task_id, spec in wave_ids.items()}
    check_and_report(f"cluster node {how}", everything, watchers + later, final, workers, logs_of=servers, extra={
        "finished_before_fault": finished_before_fault,
        "accepted_during_failover": sum(len(ids) for ids in accepted_after),
        "lost": sum(1 for status in final.values() if not status.terminal),
        "reconnects": sum(process.stderr.count("lost connection to RabbitMQ") for process in processes)})
    assert all(process.alive() for process in processes), tails(processes)


#: Quorum queues led by the node that is killed: the more, the surer one first publish
#: lands while their leaders are being elected again.
LEADERLESS_QUEUES = 10
#: Bound on every publish being confirmed after the kill (elections take about a second).
CONFIRMED_AFTER_KILL_S = 60.0


def test_publishes_right_after_the_leaders_node_is_killed_are_confirmed_once_new_leaders_are_elected(
        cluster, caplog):
    """RabbitMQ 3.10 refuses (basic.nack) every publish on a channel whose first publish
    to a quorum queue came while the queue's leader was on a node just killed, long after
    a new leader was elected (qm/broker/confirms.py). The broker publishes again on a fresh
    channel after a refusal, so each of these publishes, made right after the kill, is
    confirmed and stored once."""
    caplog.set_level(logging.INFO, logger="qm.broker.rabbitmq")
    leader, survivor = cluster.nodes[0], cluster.nodes[1]
    queues = [f"qm.cluster.leaderless.{uuid.uuid4().hex[:8]}" for _ in range(LEADERLESS_QUEUES)]

    async def scenario() -> list[int]:
        declaring = RabbitMQBroker(leader.url, connection_name="qm-test-declare")
        await declaring.connect()
        for queue in queues:  # declared through the leader's node: it leads them
            await declaring.declare_queue(queue, {"x-queue-type": "quorum"})
        await declaring.close()
        publisher = RabbitMQBroker(survivor.url, connection_name="qm-test-publish")
        await publisher.connect()
        try:
            leader.kill()
            await asyncio.wait_for(asyncio.gather(*(
                publish_until_confirmed(publisher, "", queue, queue.encode(), {}, queue) for queue in queues)),
                CONFIRMED_AFTER_KILL_S)
            sizes = [await publisher.queue_size(queue) for queue in queues]
            for queue in queues:
                await publisher.delete_queue(queue)
            return sizes
        finally:
            await publisher.close()

    sizes = asyncio.run(scenario())
    fresh = sum("publishing on a fresh channel" in record.getMessage() for record in caplog.records)
    print(f"\n[faults] publish after leader kill: queues={len(queues)}, stored_once={sizes.count(1)}, "
          f"fresh_channels_after_refusals={fresh}", flush=True)
    assert sizes == [1] * len(queues)  # each publish stored once
