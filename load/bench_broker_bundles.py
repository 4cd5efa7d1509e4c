"""What RabbitMQ costs per task when several tasks share one message: the lever left.

A private RabbitMQ node; one durable quorum queue, as QueueMaster's default. For each
bundle size B, interleaved over the rounds: publish TASKS tasks as TASKS / B persistent
messages of B task bodies each, streamed without waiting (qm-server's submit_many keeps a
window of confirms in flight; here the publisher does not ask for confirms, and waits until
the queue holds them all), then consume them all (prefetch 64, acks with multiple=True
every 32). Reported: RabbitMQ's CPU (the node's whole process tree) per task, medians.
The clients are pika's blocking adapter in this process; their CPU is not counted.

This is a measurement of the broker alone, not of a QueueMaster feature: QueueMaster
sends one task per message (docs/architecture.md, "Performance").

    .venv/bin/python load/bench_broker_bundles.py [--tasks 4000] [--bundles 1,8,32] [--rounds 5]
                                                  [--ack-every 32] [--confirm]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import pika

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_dispatch import tree_cpu_s  # noqa: E402

from qm.testing.rabbitmq import LocalRabbitMQ  # noqa: E402

#: A `math` task's message body is about this size (the TaskMessage of "1 + 2 * 5").
TASK_BODY_BYTES = 120
#: The consumer's prefetch (an ack must come within it, or delivery stops).
PREFETCH = 64
#: Bound on each wait of a round (the queue filling, the consumer draining it).
ROUND_BOUND_S = 300.0


def one_round(url: str, queue: str, tasks: int, bundle: int, broker_pid: int, ack_every: int = 32,
              confirm: bool = False) -> float:
    """RabbitMQ CPU ms per task for publishing and consuming `tasks` in bundles of `bundle`,
    acking every `ack_every` messages (multiple), each publish confirmed first if `confirm`."""
    messages = tasks // bundle
    body = b"x" * (TASK_BODY_BYTES * bundle)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        if confirm:
            channel.confirm_delivery()  # basic_publish now waits for each confirm
        before = tree_cpu_s(broker_pid)
        for _ in range(messages):
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
        deadline = time.monotonic() + ROUND_BOUND_S
        while (ready := channel.queue_declare(queue, passive=True).method.message_count) < messages:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready} of {messages} messages in the queue after {ROUND_BOUND_S} s")
            time.sleep(0.05)
        received = 0
        channel.basic_qos(prefetch_count=PREFETCH)
        deadline = time.monotonic() + ROUND_BOUND_S
        for method, _properties, _body in channel.consume(queue, inactivity_timeout=1.0):
            if method is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{received} of {messages} messages consumed in {ROUND_BOUND_S} s")
                continue
            received += 1
            if received % ack_every == 0 or received == messages:
                channel.basic_ack(method.delivery_tag, multiple=True)
            if received == messages:
                break
        channel.cancel()
        after = tree_cpu_s(broker_pid)
    finally:
        connection.close()
    return (after - before) * 1000.0 / tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4000, help="tasks per round and bundle size (4000)")
    parser.add_argument("--bundles", default="1,8,32", help="comma-separated tasks per message (1,8,32)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are shown (5)")
    parser.add_argument("--ack-every", type=int, default=32,
                        help="consumer acks (multiple) every N messages (32; 1: one ack per message)")
    parser.add_argument("--confirm", action="store_true",
                        help="wait for each publish's confirm before the next (as sequential submits do)")
    args = parser.parse_args(argv)
    bundles = [int(b) for b in args.bundles.split(",")]
    if any(b < 1 or args.tasks % b for b in bundles):
        parser.error("each bundle size must be at least 1 and divide --tasks")
    if not 1 <= args.ack_every <= PREFETCH:
        parser.error(f"--ack-every must be 1 to {PREFETCH} (the consumer's prefetch)")
    base = pathlib.Path(tempfile.mkdtemp(prefix="qm-bench-bundles-"))
    rabbitmq = LocalRabbitMQ(base / "rabbitmq")
    results: dict[int, list[float]] = {b: [] for b in bundles}
    try:
        url = rabbitmq.start()
        assert rabbitmq.process is not None
        setup = pika.BlockingConnection(pika.URLParameters(url))
        setup.channel().queue_declare("bundles", durable=True, arguments={"x-queue-type": "quorum"})
        setup.close()
        for number in range(args.rounds):
            order = bundles if number % 2 == 0 else bundles[::-1]
            for bundle in order:
                results[bundle].append(one_round(url, "bundles", args.tasks, bundle, rabbitmq.process.pid,
                                                 args.ack_every, args.confirm))
            print(f"round {number + 1} of {args.rounds}: "
                  + ", ".join(f"B={b} {results[b][-1]:.3f}" for b in bundles), flush=True)
    finally:
        rabbitmq.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nRabbitMQ CPU ms per task, median of {args.rounds} rounds of {args.tasks} tasks (quorum queue; "
          f"ack every {args.ack_every}, {'each publish confirmed' if args.confirm else 'streamed'}):")
    for bundle in bundles:
        print(f"  {bundle:>3} task(s) per message: {statistics.median(results[bundle]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
