"""Several tiny tasks to one work-queue message: the servers' half of bundles.

RabbitMQ costs per message, and so do the worker's deliveries and acks: a `math` task
is about a tenth of a millisecond of work and a whole message of overhead. While a
`submit_many` (SubmitTasks) call publishes, the tasks one loop turn publishes to one work
queue go as one message (messages.TaskBundle, header qm-bundle), at most
`server.bundle_max_tasks` each, when all of these hold:

- the type is tiny: the mean run time of its tasks, as their children timed them (each
  outcome event's run_s: a busy supervisor's late wake-ups are not in it), is under
  TINY_BELOW_S (it stops being tiny over TINY_UNTIL_S). A type with no history
  yet, or slower, goes one task a message: a bundle of long tasks would sit on one worker
  while another is idle;
- every live worker of the queue says it reads bundles (Feature.BUNDLES in its heartbeat),
  and there is one: a worker older than bundles would reject one (if one joins meanwhile
  and does, the dead-letter reader publishes the tasks again one a message:
  qm/server/dead_letters.py);
- the queue is far from `broker.max_queue_length`, which counts messages: its depth (read
  again once older than DEPTH_MAX_AGE_S, one read shared by the publishes waiting for it)
  times the bundle size is under the cap; near it, tasks go one a message.

Each task's submit waits for the confirm of the message that holds it, so "OK only after
the confirm" holds per task; a refused or lost bundle fails each of its tasks' submits as
a refused single message would. The worker's half: qm/worker/bundles.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Callable

from qm.background import Background
from qm.broker import topology
from qm.broker.base import Broker
from qm.errors import BrokerUnavailable
from qm.messages import TaskMessage, encode_bundle
from qm.metrics import ServerMetrics
from qm.protocol import Feature, Header

log = logging.getLogger(__name__)

#: Tasks of at most this many to a message, unless server.bundle_max_tasks says otherwise.
DEFAULT_BUNDLE_MAX_TASKS = 16
#: A type is tiny once its mean run time (seconds) is under this: the worker's top prefetch
#: level (qm/worker/prefetch.py), where a bundle of 16 is at most about 80 ms of work ...
TINY_BELOW_S = 0.005
#: ... and stops being tiny over this.
TINY_UNTIL_S = 0.01
#: Weight of the newest run in a type's mean run time.
RUN_MEAN_ALPHA = 0.2
#: Oldest a work queue's depth may be when it decides whether a bundle fits under the cap.
DEPTH_MAX_AGE_S = 1.0
#: Oldest the workers' verdict on a queue may be (whether all read bundles): asked of the
#: worker directory at most this often per queue, not per task (it walks every worker).
READERS_MAX_AGE_S = 1.0

#: Set while a SubmitTasks call publishes: only its tasks are bundled (a lone submit
#: would only wait for the end of its loop turn to go alone).
BATCH = contextvars.ContextVar("qm_submit_batch", default=False)


class RunTimes:
    """Each task type's mean run time, from the outcomes applied, and whether it is tiny."""

    def __init__(self, types: frozenset[str]) -> None:
        self.types = types  # the installed types: nothing else is kept
        self._mean_s: dict[str, float] = {}
        self._tiny: set[str] = set()

    def observe(self, task_type: str, run_s: float) -> None:
        if task_type not in self.types:
            return
        previous = self._mean_s.get(task_type)
        mean_s = run_s if previous is None else RUN_MEAN_ALPHA * run_s + (1 - RUN_MEAN_ALPHA) * previous
        self._mean_s[task_type] = mean_s
        if mean_s < TINY_BELOW_S:
            self._tiny.add(task_type)
        elif mean_s > TINY_UNTIL_S:
            self._tiny.discard(task_type)

    def tiny(self, task_type: str) -> bool:
        return task_type in self._tiny


class Bundler:
    """Publishes tasks to the work queues, the ones of a SubmitTasks call that qualify
    (module docstring) bundled per loop turn and work queue."""

    def __init__(
        self,
        broker: Broker,
        run_times: RunTimes,
        all_read: Callable[[str, str], bool],
        max_tasks: int = DEFAULT_BUNDLE_MAX_TASKS,
        max_queue_length: int = 0,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.run_times = run_times
        self.all_read = all_read  # (logical queue, feature) -> every live worker of it names it
        self.max_tasks = max_tasks
        self.max_queue_length = max_queue_length
        self.metrics = metrics or ServerMetrics()
        self.clock = clock
        self._pending: dict[str, list[tuple[bytes, dict, asyncio.Future]]] = {}  # routing key → this turn's
        self._flush_scheduled = False
        self._depth: dict[str, tuple[int | None, float]] = {}  # work queue → (messages ready, when read)
        self._reading: dict[str, asyncio.Future] = {}  # work queue → its depth being read
        self._readers: dict[str, tuple[bool, float]] = {}  # logical queue → (all read bundles, when asked)
        self.origin = ""  # the store its tasks are in (Header.ORIGIN), set once the server knows it
        self._background = Background()

    async def publish(self, message: TaskMessage, body: bytes) -> None:
        """Publish a task to qm.tasks (confirmed when this returns): in a bundle if it
        qualifies, else alone."""
        if not await self._qualifies(message):
            await self.broker.publish(topology.TASKS_EXCHANGE, message.routing_key, body, message.headers())
            return
        future = asyncio.get_running_loop().create_future()
        pending = self._pending.setdefault(message.routing_key, [])
        pending.append((body, message.headers(), future))
        if len(pending) >= self.max_tasks:
            self._send(message.routing_key, self._pending.pop(message.routing_key))
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    async def _qualifies(self, message: TaskMessage) -> bool:
        return (
            self.max_tasks > 1
            and BATCH.get()
            and self.run_times.tiny(message.type)
            and self._all_read(message.queue)
            and await self._room(topology.work_queue_name(message.queue, priority=message.priority, cpus=message.cpus))
        )

    def _all_read(self, queue: str) -> bool:
        """Whether every live worker of `queue` reads bundles, asked again once older than
        READERS_MAX_AGE_S (heartbeats come every few seconds anyway)."""
        verdict, asked_at = self._readers.get(queue, (False, -READERS_MAX_AGE_S - 1.0))
        now_s = self.clock()
        if now_s - asked_at > READERS_MAX_AGE_S:
            verdict = self.all_read(queue, Feature.BUNDLES)
            self._readers[queue] = (verdict, now_s)
        return verdict

    async def _room(self, work_queue: str) -> bool:
        """Whether a bundle fits under the queue cap, by the queue's depth: read again once
        older than DEPTH_MAX_AGE_S, one read for all the publishes that wait for it (a
        broker round trip, about once a second per queue while batches come)."""
        if not self.max_queue_length:
            return True
        depth, read_at = self._depth.get(work_queue, (0, -DEPTH_MAX_AGE_S - 1.0))
        if self.clock() - read_at > DEPTH_MAX_AGE_S:
            reading = self._reading.get(work_queue)
            if reading is None:
                reading = self._reading[work_queue] = asyncio.ensure_future(self._read_depth(work_queue))
            depth = await asyncio.shield(reading)
        return depth is not None and depth * self.max_tasks < self.max_queue_length

    async def _read_depth(self, work_queue: str) -> int | None:
        """The queue's depth (None: unknown, no bundles), kept for DEPTH_MAX_AGE_S."""
        try:
            depth = await self.broker.queue_size(work_queue)
        except BrokerUnavailable as exc:
            log.debug("cannot read the depth of %s: %s", work_queue, exc)
            depth = None
        finally:
            self._reading.pop(work_queue, None)
        self._depth[work_queue] = (depth, self.clock())
        return depth

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for routing_key, items in pending.items():
            self._send(routing_key, items)

    def _send(self, routing_key: str, items: list[tuple[bytes, dict, asyncio.Future]]) -> None:
        self._background.spawn(self._publish_bundle(routing_key, items))

    async def _publish_bundle(self, routing_key: str, items: list[tuple[bytes, dict, asyncio.Future]]) -> None:
        if len(items) == 1:
            body, headers = items[0][0], items[0][1]
        else:
            body = encode_bundle([item[0] for item in items])
            headers = {Header.BUNDLE: len(items), Header.ORIGIN: self.origin}
        try:
            await self.broker.publish(topology.TASKS_EXCHANGE, routing_key, body, headers)
        except BaseException as exc:
            for _body, _headers, future in items:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else BrokerUnavailable(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        if len(items) > 1:
            self.metrics.bundled_tasks.inc(len(items))
        for _body, _headers, future in items:
            if not future.done():
                future.set_result(None)

    async def wait(self, timeout_s: float | None = None) -> None:
        """Wait for the bundles being published (at stop)."""
        await self._background.wait(timeout_s)
