"""The RabbitMQ node everyone is connected to goes away mid-run, on a 3-node cluster.

Two qm-servers (each its own SQLite store) and two qm-workers are given the three nodes'
URLs in the same order, so all of them connect to the first node. Clients submit to both
servers; once tasks are flowing, a second wave of submissions starts and the first node is
stopped gracefully (SIGTERM: what `rabbitmqctl stop` does) or SIGKILLed. Nothing is
restarted: every process must move to another node by itself, and every accepted task,
of both waves, must reach exactly one terminal state with the right result (quorum work
queues with 3 members, quorum server queues: broker.quorum_initial_group_size and
broker.server_queue_type). Counts are printed as the fault suite prints them.
"""
from __future__ import annotations

import concurrent.futures
import re

import pytest

import qm
from tests.faults.support import (SETTLE_TIMEOUT_S, Spec, Watcher, check_and_report, mixed_workload, statuses,
                                  submit_all, tails, wait_settled)
from tests.processes import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

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


def _connected_elsewhere(lost_port: int) -> re.Pattern:
    """The keeper's line on connecting to a node other than the lost one."""
    return re.compile(rf"connected to RabbitMQ at 127\.0\.0\.1:(?!{lost_port}\b)\d+")


#: Known defect (issue 13, open): on the merged tree the SIGKILL case, run after the stop
#: case on the same cluster, leaves workers' outcome events refused (basic.nack) by RabbitMQ
#: for 30 s and more, so tasks stall; it passes alone and passed on the failover branch
#: (bc8a2f6) in sequence. Bisected to the merges of sec-auth/perf-server (a83d8cb); not yet
#: understood. Non-strict: it still runs and reports its counts every time.
KILL_AFTER_STOP_DEFECT = pytest.mark.xfail(
    strict=False, reason="issue 13: outcome events nacked for 30 s+ after a node SIGKILL following a stop")


@pytest.mark.parametrize("how", ["stop", pytest.param("kill", marks=KILL_AFTER_STOP_DEFECT)])
def test_the_connected_node_goes_away_mid_run(cluster, launcher, how, tmp_path):
    first = cluster.nodes[0]
    urls = ",".join(cluster.urls)  # everyone connects to the first node
    queue = launcher.queue(cluster.nodes[1].url)  # deleted in teardown through a node that stays up
    servers = [launcher.server(urls, env=CLUSTER_ENV) for _ in range(2)]
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

            marks = {process: process.line_count() for process in processes}
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
