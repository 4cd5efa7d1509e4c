"""What a worker and RabbitMQ save when tiny tasks come several to a message (bundles).

Servers do not send bundles yet; workers read them (qm/worker/bundles.py). This measures
that reading side on real processes: a private RabbitMQ node, one qm-server, and for each
round a fresh `qm-worker --procs 2` on a queue of its own. Each round submits TASKS `math`
tasks with submit_many while no worker consumes the queue, takes their messages off it,
starts the worker, and once it is idle publishes the messages back (as they were, or as
bundles of B, as a server that bundles would), then follows the results to the last one.
Rounds alternate single/bundled. Reported, medians over the rounds: CPU ms per task of the
supervisor, its children, RabbitMQ and the server from the first publish back to the last
result seen, and the rate over that span. The publisher is pika in this process (not
counted); in a real system the server's publishes would cost per message as well.

    .venv/bin/python load/bench_worker_bundles.py [--tasks 4000] [--bundle 16] [--rounds 4]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import pika

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench_dispatch import MATH_PAYLOAD, MATH_RESULT, tree_cpu_s  # noqa: E402

import qm  # noqa: E402
from qm.broker import topology  # noqa: E402
from qm.messages import encode_bundle  # noqa: E402
from qm.protocol import Header  # noqa: E402
from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402
from tests.processes import band_queues, delete_queues, start_server, start_worker, unique  # noqa: E402

#: Bound on the submitted messages being taken off the queue, and on the results.
BOUND_S = 300.0


def take_messages(url: str, queue: str, count: int) -> list[bytes]:
    """The bodies of the first `count` messages on `queue`'s work queue, taken off it."""
    work_queue = topology.work_queue_name(queue)
    bodies: list[bytes] = []
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        deadline = time.monotonic() + BOUND_S
        while len(bodies) < count and time.monotonic() < deadline:
            method, _properties, body = channel.basic_get(work_queue, auto_ack=True)
            if method is None:
                connection.sleep(0.05)
                continue
            bodies.append(body)
    if len(bodies) < count:
        raise TimeoutError(f"only {len(bodies)} of {count} messages on {work_queue}")
    return bodies


def publish_back(url: str, queue: str, bodies: list[bytes], bundle: int) -> None:
    """Publish `bodies` to `queue`'s work queue, `bundle` to a message (1: as they were),
    persistent, confirmed as a whole at the end (a passive declare after the last)."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        for start in range(0, len(bodies), bundle):
            chunk = bodies[start:start + bundle]
            body, headers = (chunk[0], {}) if bundle == 1 else (encode_bundle(chunk), {Header.BUNDLE: len(chunk)})
            channel.basic_publish(topology.TASKS_EXCHANGE, topology.routing_key(queue), body,
                                  pika.BasicProperties(delivery_mode=2, headers=headers))


def one_round(url: str, broker_pid: int, server, client: qm.Client, tasks: int, bundle: int) -> dict[str, float]:
    queue = unique("bench")
    try:
        ids = client.submit_many([("math", MATH_PAYLOAD)] * tasks, queue=queue)
        bodies = take_messages(url, queue, tasks)
        worker = start_worker(url, procs=2, queues=queue)
        try:
            time.sleep(1.0)  # let its start-up settle: forkserver, children ready
            before = {"supervisor": tree_cpu_s(worker.pid), "rabbitmq": tree_cpu_s(broker_pid),
                      "server": tree_cpu_s(server.pid)}
            children_before = tree_cpu_s(worker.pid, with_root=False)
            t0 = time.monotonic()
            publish_back(url, queue, bodies, bundle)
            results = list(client.results(ids, timeout_s=BOUND_S))
            elapsed_s = time.monotonic() - t0
            children_s = tree_cpu_s(worker.pid, with_root=False) - children_before
            after = {"supervisor": tree_cpu_s(worker.pid), "rabbitmq": tree_cpu_s(broker_pid),
                     "server": tree_cpu_s(server.pid)}
        finally:
            worker.stop()
        wrong = [r for r in results if (r.state, r.result) != ("SUCCEEDED", MATH_RESULT)]
        if len(results) != tasks or wrong:
            raise AssertionError(f"{len(results)} results, {len(wrong)} wrong: {wrong[:3]}")
        ms = {name: (after[name] - before[name]) * 1e3 / tasks for name in after}
        ms["children"] = children_s * 1e3 / tasks
        ms["supervisor"] -= ms["children"]
        ms["all"] = ms["supervisor"] + ms["children"] + ms["rabbitmq"] + ms["server"]
        ms["tasks_per_s"] = tasks / elapsed_s
        return ms
    finally:
        delete_queues(url, band_queues(queue))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--bundle", type=int, default=16, help="tasks per message in the bundled rounds")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each (alternating)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rabbitmq = LocalRabbitMQ(pathlib.Path(tmp) / "rabbitmq")
        url = rabbitmq.start()
        server = start_server(url, pathlib.Path(tmp))
        try:
            with qm.Client(server.address) as client:
                rows: dict[int, list[dict[str, float]]] = {1: [], args.bundle: []}
                for n in range(args.rounds):
                    for bundle in ((1, args.bundle) if n % 2 == 0 else (args.bundle, 1)):
                        rows[bundle].append(one_round(url, rabbitmq.process.pid, server, client, args.tasks, bundle))
                        r = rows[bundle][-1]
                        print(f"round {n + 1}, {bundle} a message: all {r['all']:.3f} ms/task, "
                              f"{r['tasks_per_s']:.0f} tasks/s", flush=True)
        finally:
            server.stop()
            rabbitmq.stop()
    columns = ["supervisor", "children", "rabbitmq", "server", "all", "tasks_per_s"]
    print(f"\n{args.tasks} math tasks a round, {args.rounds} rounds each, medians (CPU ms per task; rate)")
    print("| tasks a message | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for bundle, measured in rows.items():
        cells = [statistics.median(m[c] for m in measured) for c in columns]
        print(f"| {bundle} | " + " | ".join(f"{v:.3f}" if c != "tasks_per_s" else f"{v:,.0f}"
                                          for c, v in zip(columns, cells, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
