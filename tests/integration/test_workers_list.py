"""`qm workers`: workers announce themselves; a silent one is shown as lost, a stopped one as stopped."""
from __future__ import annotations

import json
import socket

import qm
from tests.processes import run_qm, wait_until

SEEN_TIMEOUT_S = 30.0


def listed(server) -> dict[str, dict]:
    result = run_qm("workers", "--json", server=server.address)
    assert result.returncode == 0, result.stderr
    return {item["worker_id"]: item for item in map(json.loads, result.stdout.splitlines())}


def test_workers_are_listed_live_then_lost_or_stopped(rabbitmq, launcher):
    queue = launcher.queue(rabbitmq.url)
    server = launcher.server(rabbitmq.url, env={"QM_SERVER__WORKER_LOST_AFTER_S": "3"})
    beat_fast = {"QM_WORKER__HEARTBEAT_INTERVAL_S": "0.5"}
    doomed = launcher.worker(rabbitmq.url, procs=2, queues=queue, env=beat_fast)
    graceful = launcher.worker(rabbitmq.url, procs=1, queues=queue, env=beat_fast)

    def both_seen():
        workers = listed(server)
        return workers if {doomed.worker_id, graceful.worker_id} <= set(workers) else None

    workers = wait_until(both_seen, SEEN_TIMEOUT_S, message="both workers heard from")
    first = workers[doomed.worker_id]
    assert (first["state"], first["pid"], first["procs"], first["busy"]) == ("active", doomed.pid, 2, 0)
    assert (first["host"], first["queues"], first["version"]) == (socket.gethostname(), [queue], qm.__version__)
    assert "math" in first["types"]
    text = run_qm("workers", server=server.address).stdout
    assert doomed.worker_id in text and "2 active worker(s)" in text

    doomed.kill()
    assert graceful.stop() == 0
    wait_until(lambda: listed(server)[doomed.worker_id]["state"] == "lost", SEEN_TIMEOUT_S,
               message="the killed worker shown as lost")
    assert listed(server)[graceful.worker_id]["state"] == "stopped"
