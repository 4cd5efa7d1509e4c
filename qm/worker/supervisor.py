"""The worker supervisor: RabbitMQ deliveries in, task events out, a process pool between.

    RabbitMQ work queue(s) ──deliveries (prefetch, manual ack)──► Supervisor._handle
                                                                      │ decode TaskMessage,
                                                                      │ cap its limits
                                                                      ▼
                          publish RUNNING event ◄── on_started ── Pool.run(job)
          progress events (≤ 10/s, advisory) ◄── on_progress ──┤ (qm/worker/progress_events.py)
                                                                      │ Outcome (the pool's
                                                                      │ deadline and RSS
                                                                      ▼ watchdogs kill)
    qm.events exchange ◄── publish outcome event (await confirm) ── then ack delivery
                                                  │     (batched: qm/worker/acks.py)
                                                  └──► prefetch.observe(run time) → set_prefetch

A redelivered delivery (its last holder may have died of it) passes the Isolation gate
first: it runs alone, its RUNNING confirmed before it starts, so the servers can count the
starts of a task that kills workers. Deliveries this worker gives back on purpose,
unstarted (prefetch drop, drain), go back as confirmed copies (`_give_back`), so they are
not suspects. A delivery is acked only after its outcome is confirmed by the broker
(qm/worker/outcomes.py), so a crash anywhere before that means RabbitMQ redelivers the
task (at-least-once); acks of deliveries whose outcomes are confirmed in the same loop
turn go out as one `multiple` ack. Cancels and poison verdicts come from the control
stream (qm/worker/control.py). A delayed task that comes before its due time is sent on to
a delay tier, not run (qm/scheduling.py). Everything runs on one asyncio loop that never
waits on task work, so AMQP heartbeats keep flowing however long tasks take. While tasks
are short the pool pipelines (a busy child holds its next job: Pool.pipeline).

A message may hold several tasks (a bundle, qm/worker/bundles.py): each is handled as a
delivery of its own, and the message is acked once all are settled; a redelivered bundle
is split into single suspect messages before any of its tasks runs. Every heartbeat says
this worker reads bundles (Feature.BUNDLES), so servers may send them.

Multi-CPU tasks (`cpus` N > 1) come from work queues of their own size,
`qm.tasks.<queue>.cpus<N>`; a worker with P procs consumes the sizes 2..P of each of its
queues, each with a fixed prefetch of P // N (as many as could run at once on an idle
worker; the adaptive prefetch is for single-CPU queues), so it never takes a task it
could never fit. Size queues carry no priority bands (priority orders single-CPU tasks,
each priority band a work queue of its own: qm/priority.py); once held here, a
multi-CPU task takes its place in the pool's line by its priority like any other. The
pool holds N of its P CPU slots while such a task runs (qm/worker/cpu_slots.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from typing import Awaitable

import qm
from qm import limits as task_limits
from qm import priority as priorities
from qm import retry, scheduling
from qm.background import Background
from qm.broker import topology
from qm.broker.base import REPUBLISH_WAIT_S, Broker, Delivery, publish_until_confirmed
from qm.errors import BrokerUnavailable
from qm.messages import Heartbeat, TaskMessage, is_bundle
from qm.metrics import WorkerMetrics
from qm.protocol import Feature, Header
from qm.states import TaskState
from qm.task_progress import Progress
from qm.worker.announce import StartAnnouncement
from qm.worker.bundles import BundleAcks, Member, is_suspect
from qm.worker.control import ControlFollower
from qm.worker.isolation import Isolation
from qm.worker.outcomes import Outcomes
from qm.worker.pool import Job, Outcome, Pool
from qm.worker.prefetch import AutoPrefetch, FixedPrefetch
from qm.worker.progress_events import ProgressEvents
from qm.worker.ready import priority_of_body
from qm.worker.tally import OutcomeTally

log = logging.getLogger(__name__)

#: Longest a drain waits for copies whose originals may stay with a node that went away
#: (`Supervisor._may_stay_away`; the copies may be the tasks' only way back to the queue):
#: reconnecting to another node of a cluster takes seconds; past this, the node the
#: originals were on returning is the likelier way back.
ONLY_COPIES_WAIT_S = 60.0
#: Outcomes that mean the child was killed or lost, and their `reason` label.
KILL_REASONS = {
    TaskState.TIMED_OUT: "timeout",
    TaskState.MEMORY_EXCEEDED: "memory",
    TaskState.CRASHED: "crash",
    TaskState.CANCELLED: "cancel",
}
#: Run time after which a running task counts as long for the prefetch, before it ends.
LONG_TASK_S = 1.0
#: Weight of the latest run in the mean run time that decides how starts are announced.
RUN_MEAN_ALPHA = 0.2
#: A delivery held unstarted this long, as a share of RabbitMQ's consumer_timeout, is given
#: back (tasks of higher priority kept overtaking it): an unacked delivery past the timeout
#: would make RabbitMQ close its channel and return everything on it as suspects.
HELD_SHARE_OF_CONSUMER_TIMEOUT = 0.5


class Supervisor:
    """Consumes tasks, runs them on the pool, reports outcomes, acks."""

    def __init__(
        self,
        broker: Broker,
        pool: Pool,
        worker_id: str,
        queues: list[str],
        prefetch: AutoPrefetch | FixedPrefetch | int,
        queue_type: str = "quorum",
        *,
        caps: task_limits.Limits = task_limits.Limits(0.0, 0),
        delivery_limit: int = 5,
        metrics: WorkerMetrics | None = None,
        max_queue_length: int = 0,
        max_result_bytes: int = 0,
        pack_events: bool = True,
        consumer_timeout_s: float = 1800.0,
        running_event_delay_s: float = 0.05,
    ) -> None:
        self.broker = broker
        self.running_event_delay_s = running_event_delay_s  # worker.running_event_delay_s
        self._mean_run_s: float | None = None  # recent runs' mean time (EWMA), for announcing
        self.pool = pool
        self.worker_id = worker_id
        self.queues = queues
        self.prefetch = FixedPrefetch(prefetch) if isinstance(prefetch, int) else prefetch
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.max_queue_length = max_queue_length
        self.metrics = metrics or WorkerMetrics()
        self.caps = caps
        self.draining = False
        self.control = ControlFollower(broker, worker_id, self._cancel)
        self.outcomes = Outcomes(
            broker, worker_id, self.metrics, max_result_bytes=max_result_bytes, pack_events=pack_events
        )
        self._consumer_tags: list[str] = []
        self._isolation = Isolation()
        self._unsettled: dict[asyncio.Task, Delivery] = {}  # handler → its delivery, until settled
        self._waiting: set[asyncio.Task] = set()  # handlers whose job has not started
        self._background = Background()
        self._copies: dict[asyncio.Task, Delivery] = {}  # deliveries being given back as copies
        self.acks = BundleAcks(broker, self._background.spawn)  # bundles: qm/worker/bundles.py
        self.progress = ProgressEvents(self.outcomes.events, worker_id, self.metrics, self._background)
        self._by_task: dict[str, asyncio.Task] = {}  # task id → its handler
        self._queue_of: dict[str, str] = {}  # consumer tag → routing key of its work queue (band or size)
        self._size_tags: set[str] = set()  # consumers of multi-CPU work queues (fixed prefetch)
        self.max_held_s = consumer_timeout_s * HELD_SHARE_OF_CONSUMER_TIMEOUT
        self._held_since: dict[asyncio.Task, float] = {}  # unstarted handler → when its delivery came
        self._held_check: asyncio.TimerHandle | None = None
        self.tally = OutcomeTally(log)  # the INFO summary of ended runs (successes log at DEBUG)

    async def start(self) -> None:
        await self.broker.declare_exchange(topology.EVENTS_EXCHANGE, "fanout")
        await self.broker.declare_exchange(topology.HEARTBEATS_EXCHANGE, "fanout")
        await self.control.start()
        # Every delay tier exists before the first retry needs it: a quorum queue created
        # moments before its node is SIGKILLed can lose what it was just given.
        for tier_s in retry.DELAY_TIERS_S:
            await self.outcomes.ensure_delay_tier(tier_s)
        for queue in self.queues:
            await self._consume_bands(queue)
            await self._consume_sizes(queue)
        self._check_held()
        log.info(
            "worker %s consuming %s (3 priority bands each, and the multi-CPU sizes up to %d) with "
            "prefetch %d per band (%s), %d children",
            self.worker_id,
            ", ".join(self.queues),
            self.pool.procs,
            self.prefetch.value,
            "auto" if isinstance(self.prefetch, AutoPrefetch) else "fixed",
            self.pool.procs,
        )

    async def _consume_bands(self, queue: str) -> None:
        """Consume the work queue of each priority band of `queue`, highest first (qm/priority.py).
        Each consumer has its own prefetch (basic.qos per consumer: RabbitMQ's `global`
        false), so a backlog held from one band never keeps another band's tasks from being
        delivered; the pool then starts the highest priority held (qm/worker/ready.py)."""
        for band in priorities.band_priorities():
            name = await topology.declare_work_queue(
                self.broker, queue, self.queue_type, self.delivery_limit, self.max_queue_length, priority=band
            )
            tag = await self.broker.consume(name, self._on_delivery, self.prefetch.value)
            self._consumer_tags.append(tag)
            self._queue_of[tag] = topology.routing_key(queue, priority=band)

    async def _consume_sizes(self, queue: str) -> None:
        """Consume the work queues of the multi-CPU task sizes this worker fits, 2..procs,
        each with prefetch procs // size. Declared here (idempotent), so a size's queue
        exists for the server's first submit of it."""
        for cpus in range(2, self.pool.procs + 1):
            name = await topology.declare_work_queue(
                self.broker, queue, self.queue_type, self.delivery_limit, self.max_queue_length, cpus=cpus
            )
            tag = await self.broker.consume(name, self._on_delivery, self.pool.procs // cpus)
            self._size_tags.add(tag)
            self._queue_of[tag] = topology.routing_key(queue, cpus=cpus)

    def _check_held(self) -> None:
        """Give back (as copies: `_give_back`) deliveries held unstarted past `max_held_s`,
        then look again in a quarter of that; until the drain."""
        if self.draining:
            return
        now_s = time.monotonic()
        overheld = [
            handler
            for handler, since_s in self._held_since.items()
            if handler in self._waiting and now_s - since_s > self.max_held_s
        ]
        if overheld:
            log.warning(
                "giving back %d deliveries held unstarted over %.0f s (higher priorities kept coming first, "
                "or a multi-CPU task first in line waited for CPU slots)",
                len(overheld),
                self.max_held_s,
            )
        for handler in overheld:
            self._give_back(handler)
        self._held_check = asyncio.get_running_loop().call_later(self.max_held_s / 4, self._check_held)

    def _cancel(self, task_id: str) -> None:
        """A cancel from the control stream: drop the task if it waits here, kill it if it runs."""
        handler = self._by_task.get(task_id)
        if handler is None:
            return
        if handler in self._waiting:
            log.info("task %s cancelled before it started", task_id)
            self._settle(handler, ack=True)
            handler.cancel()
            return
        if self.pool.kill_task(task_id, Outcome(TaskState.CANCELLED, error="cancelled by request while running")):
            log.info("task %s cancelled while running (or about to start): killing its child", task_id)

    def _on_delivery(self, delivery: Delivery) -> None:
        self.acks.track(delivery)
        if is_bundle(delivery.headers):  # several tasks: each handled as a delivery of its own
            for member in self.acks.open(delivery):
                self._start_handler(member)
            return
        self._start_handler(delivery)

    def _start_handler(self, delivery: Delivery) -> None:
        handler = asyncio.create_task(self._handle(delivery))
        self._unsettled[handler] = delivery
        self._waiting.add(handler)
        self._held_since[handler] = time.monotonic()
        handler.add_done_callback(self._waiting.discard)
        handler.add_done_callback(lambda done: self._held_since.pop(done, None))
        handler.add_done_callback(self._on_handler_done)

    def _on_handler_done(self, handler: asyncio.Task) -> None:
        if not handler.cancelled() and handler.exception() is not None:
            log.error("task handler failed; the delivery returns to the queue", exc_info=handler.exception())
        self._settle(handler, ack=False)  # no-op when the handler settled it

    def _settle(self, handler: asyncio.Task, ack: bool) -> None:
        """Ack, or return to the queue (a run cut short, a failed handler): a bundle's
        member goes back as a copy marked a suspect, as RabbitMQ would mark it redelivered;
        so does one that may stay away (`_may_stay_away`)."""
        delivery = self._unsettled.pop(handler, None)
        if delivery is None:
            return
        if ack:
            self.acks.done(delivery)
        elif isinstance(delivery, Member) or self._may_stay_away(delivery):
            self._give_back_copy(delivery, suspect=True)
        else:
            self.acks.nack(delivery, requeue=True)

    def job_for(self, message: TaskMessage) -> Job:
        """The job with the smallest limits that apply (the task's, then this worker's caps).
        The soft timeout is the one the server resolved, if the capped limit leaves room for it."""
        limits = task_limits.cap(
            task_limits.Limits(message.timeout_s, message.memory_limit_mb, message.soft_timeout_s),
            self.caps.timeout_s,
            self.caps.memory_limit_mb,
        )
        return Job(
            message.task_id,
            message.type,
            message.payload,
            limits.timeout_s,
            limits.memory_limit_mb,
            limits.soft_timeout_s,
            message.priority,
            message.cpus,
        )

    async def _handle(self, delivery: Delivery) -> None:
        handler = asyncio.current_task()
        assert handler is not None  # _handle always runs as a task (one per delivery)
        try:
            message = getattr(delivery, "message", None) or TaskMessage.decode(delivery.body)
        except ValueError as exc:
            log.error("rejecting an undecodable task message (headers %s): %s", delivery.headers, exc)
            self._unsettled.pop(handler, None)
            self.acks.nack(delivery, requeue=False)
            return
        if self.control.is_cancelled(message.task_id):
            log.info("task %s was cancelled; dropping it", message.task_id)
            self._settle(handler, ack=True)
            return
        hop_s = scheduling.hop_tier_s(message.not_before_s, self.outcomes.clock())
        if hop_s is not None:  # a delayed task, not yet due: back to a delay tier
            await self.outcomes.hold(message, hop_s, lambda: self._settle(handler, ack=True))
            return
        starts = self.control.poison_starts(message.task_id)
        if starts is not None:
            await self.outcomes.dead_letter_poison(message, starts, lambda: self._settle(handler, ack=True))
            return
        if message.cpus > self.pool.procs:  # only a message put on the wrong queue by hand
            await self.outcomes.settle(message, self._too_big(message), lambda: self._settle(handler, ack=True))
            return
        self._by_task[message.task_id] = handler
        handler.add_done_callback(lambda _: self._by_task.pop(message.task_id, None))
        job = self.job_for(message)
        started_at = 0.0
        # A redelivered task may be what took its last worker down: it runs alone, and its
        # start is on record (confirmed) before it runs, so the servers can count it.
        suspect = is_suspect(delivery)

        # Any other start may wait to be announced: a short run's start rides with its
        # outcome event instead (qm/worker/announce.py).
        # Handed over at once, not in a task of its own: an outcome settled in the same loop
        # turn would otherwise go out first, and the servers would drop the start as stale.
        def announce(at_s: float) -> None:
            running = self.outcomes.event(message, TaskState.RUNNING, job=job, at_s=at_s)
            self._background.spawn(_confirmed(self.outcomes.hand_over_event(running)))

        announcement = StartAnnouncement(announce)
        handler.add_done_callback(lambda _: announcement.end())

        def on_progress(update: Progress) -> None:
            announcement.announce()  # a task reporting progress is seen running first
            progress.offer(update)

        def on_started() -> None:
            nonlocal started_at
            started_at = time.monotonic()
            ready_s = max(message.enqueued_at_s, message.not_before_s or 0.0)  # a delayed one: once due
            self.metrics.queue_wait_seconds.labels(message.type, str(message.priority)).observe(
                max(0.0, time.time() - ready_s)
            )
            self._waiting.discard(handler)
            # A task still running at this point already tells the prefetch it is long,
            # before it finishes (which may be much later).
            still_running = asyncio.get_running_loop().call_later(
                LONG_TASK_S, lambda: self._observe(time.monotonic() - started_at)
            )
            handler.add_done_callback(lambda _: still_running.cancel())
            if not suspect:  # a suspect's start was announced, confirmed, before it started
                announcement.start(self.running_event_delay_s if self._defers_announcements else None)

        progress = self.progress.open(message)
        try:
            await self._isolation.enter(suspect, message.priority)
            try:
                if suspect:
                    await self.outcomes.publish_event(self.outcomes.event(message, TaskState.RUNNING, job=job))
                outcome = await self.pool.run(
                    job, on_started, on_progress, on_sent=lambda: self._waiting.discard(handler)
                )
            finally:
                self._isolation.leave(suspect)
                self.progress.close(progress)  # nothing of it after the outcome
        except asyncio.CancelledError:
            self._settle(handler, ack=False)  # back to the queue: another worker runs it
            raise
        # A success logs at DEBUG (its line cost a tenth of this process's CPU on tiny
        # tasks), every other outcome at INFO; the tally sums them up at INFO each minute.
        log.log(
            logging.DEBUG if outcome.state is TaskState.SUCCEEDED else logging.INFO,
            "task %s (%s) attempt %d: %s%s",
            message.task_id,
            message.type,
            message.attempt,
            outcome.state.name,
            f": {outcome.error.splitlines()[0]}" if outcome.error else "",
        )
        self.tally.add(outcome.state.name)
        # The child's own clock where it replied: what this loop saw also holds its own
        # wake-up, now and then 10 to 30 ms for a 0.1 ms task on a busy host.
        run_s = outcome.run_s if outcome.run_s is not None else time.monotonic() - started_at
        if outcome.run_s is None:  # a run killed or lost: its event says how long it went on
            outcome = dataclasses.replace(outcome, run_s=run_s)
        self._observe(run_s)
        self._mean_run_s = (
            run_s if self._mean_run_s is None else RUN_MEAN_ALPHA * run_s + (1 - RUN_MEAN_ALPHA) * self._mean_run_s
        )
        self.metrics.run_seconds.labels(message.type).observe(run_s)
        if outcome.state in KILL_REASONS:
            self.metrics.kills.labels(KILL_REASONS[outcome.state]).inc()
        await self.outcomes.settle(
            message, outcome, lambda: self._settle(handler, ack=True), job=job, started_at_s=announcement.end()
        )

    @property
    def _defers_announcements(self) -> bool:
        """Whether a start waits running_event_delay_s to be announced: while recent runs
        were shorter than that (most then end unannounced, one event instead of two). Once
        they are longer, each start is announced at once: it would be announced anyway, and
        told with the outcome before it the server takes both in one batch, not two."""
        if self.running_event_delay_s <= 0:
            return False
        return self._mean_run_s is None or self._mean_run_s < self.running_event_delay_s

    def _too_big(self, message: TaskMessage) -> Outcome:
        error = (
            f"task {message.task_id} ({message.type}) takes {message.cpus} CPUs but came to worker "
            f"{self.worker_id}, which has {self.pool.procs} (--procs): its message was on the wrong work "
            f"queue ({topology.work_queue_name(message.queue)}; tasks of that size belong in "
            f"{topology.work_queue_name(message.queue, cpus=message.cpus)}). Submit it again"
        )
        log.error("%s", error)
        return Outcome(TaskState.FAILED, error=error, permanent=True)

    def _observe(self, duration_s: float) -> None:
        previous = self.prefetch.value
        new_prefetch = self.prefetch.observe(duration_s)
        self.pool.pipeline = self.prefetch.short and not self.draining
        if new_prefetch is None or self.draining:
            return
        log.info("prefetch now %d per queue (mean task time %.3f s)", new_prefetch, self.prefetch.mean_s)
        if new_prefetch < previous:
            self._background.spawn(self._lower_prefetch(new_prefetch))
            return
        for tag in self._consumer_tags:
            self._background.spawn(self._set_prefetch(tag, new_prefetch))

    async def _lower_prefetch(self, prefetch: int) -> None:
        """Swap the consumers to the lower prefetch, then give back the excess. In that order:
        a copy given back earlier could be in flight to a consumer the swap cancels, and a
        quorum queue returns such deliveries marked redelivered (suspects again)."""
        await asyncio.gather(*(self._set_prefetch(tag, prefetch) for tag in self._consumer_tags))
        if not self.draining:
            self._release_excess(self.prefetch.value)

    def _release_excess(self, prefetch: int) -> None:
        """Tasks turned long: give back deliveries buffered beyond the new prefetch, so an
        idle worker can take them now. Counted per band consumer, as RabbitMQ counts them
        (basic.qos per consumer): each keeps its running deliveries and, while they are fewer
        than `prefetch`, its waiting ones of the highest priority. A redelivered one stays
        (it would only go back as a suspect again, and on a quorum queue each return counts
        toward its delivery limit). So does one whose channel is gone: its copy could not be
        published, and it still runs here, whatever the broker did with it (a node killed
        mid-swap left one task nowhere else: tests/cluster/test_broker_failover.py). On
        RabbitMQ the consumer swapped in at the lower prefetch counts only its own
        deliveries, so until the running ones end it may take up to `prefetch` more."""
        # per band consumer (the multi-CPU sizes' consumers keep their fixed prefetch)
        held_by: dict[str, list[asyncio.Task]] = {tag: [] for tag in self._consumer_tags}
        for handler, delivery in self._unsettled.items():
            held = held_by.get(delivery.consumer_tag)
            if held is not None:
                held.append(handler)
        released: list[asyncio.Task] = []
        for held in held_by.values():
            waiting = [handler for handler in held if handler in self._waiting]
            room = max(0, prefetch - (len(held) - len(waiting)))
            # the highest priorities stay (stable: the oldest of a priority first)
            waiting.sort(key=lambda handler: -priority_of_body(self._unsettled[handler].body))
            released += [
                handler
                for handler in waiting[room:]
                if not is_suspect(self._unsettled[handler]) and self.broker.settleable(self._unsettled[handler])
            ]
        if released:
            log.info(
                "prefetch dropped: giving back %d waiting deliveries (tasks %s)",
                len(released),
                ", ".join(str(self._unsettled[handler].headers.get(Header.TASK_ID)) for handler in released),
            )
        for handler in released:
            self._give_back(handler)

    def _give_back(self, handler: asyncio.Task) -> None:
        """Return an unstarted delivery on purpose. A first delivery goes back as a copy
        (same body and headers, same exchange and routing key as the server's publish), and
        the original is acked once RabbitMQ confirmed the copy: the copy arrives not
        redelivered, so it is no poison suspect and uses none of a quorum queue's delivery
        limit. Dying between confirm and ack leaves both: the original comes back
        redelivered and the task may run twice, which at-least-once covers (qm/states.py).
        A redelivered delivery is nacked back as it is: it stays a suspect. One whose channel
        is gone is RabbitMQ's to return, unless it may stay away (`_may_stay_away`): then it
        goes back as a copy, marked a suspect if it was redelivered. (A bundle's member is
        never redelivered: a redelivered bundle is split, qm/worker/bundles.py.)"""
        delivery = self._unsettled.pop(handler, None)
        handler.cancel()
        if delivery is None:
            return
        if self._may_stay_away(delivery):
            self._give_back_copy(delivery, suspect=delivery.redelivered)
        elif not self.broker.settleable(delivery):
            return  # RabbitMQ requeued it with its channel: a copy would run it twice
        elif delivery.redelivered:
            self.acks.nack(delivery, requeue=True)
        else:
            self._give_back_copy(delivery)

    def _may_stay_away(self, delivery: Delivery) -> bool:
        """Whether RabbitMQ may keep `delivery` from its queue though this worker lost it:
        its channel is gone and the broker has other nodes. A RabbitMQ 3.10 quorum queue kept
        what the consumer a prefetch swap had cancelled held on a node killed meanwhile, until
        that node returned (tests/cluster/test_broker_failover.py). With one node, what a
        lost channel held comes back with that node."""
        return self.broker.node_count > 1 and not self.broker.settleable(delivery)

    def _give_back_copy(self, delivery: Delivery, suspect: bool = False) -> None:
        """`_republish` in the background, kept until done: a drain waits for it."""
        copy = self._background.spawn(self._republish(delivery, suspect))
        self._copies[copy] = delivery
        copy.add_done_callback(lambda done: self._copies.pop(done, None))

    async def _republish(self, delivery: Delivery, suspect: bool = False) -> None:
        """Publish a copy of `delivery` (marked Header.SUSPECT if `suspect`: its run was cut
        short), then ack it. A copy refused while connected: nack the original back. A copy
        lost with the connection: published again once reconnected if the original may stay
        away (`_may_stay_away`), else left to RabbitMQ's requeue of the original."""
        # RabbitMQ sets x-delivery-count on quorum redeliveries; a first delivery has none,
        # and a copy must not carry one anyway.
        headers = {key: value for key, value in delivery.headers.items() if key != "x-delivery-count"}
        if suspect:
            headers[Header.SUSPECT] = 1
        routing_key = self._routing_key_of(delivery)
        try:
            await self.broker.publish(topology.TASKS_EXCHANGE, routing_key, delivery.body, headers)
        except BrokerUnavailable as exc:  # PublishOutcomeUnknown too: a copy may exist, a duplicate
            if self.broker.settleable(delivery):  # refused while connected: the original goes back
                log.warning("giving a delivery back as a copy failed (%s); returning it as it is", exc)
                self.acks.nack(delivery, requeue=True)
                return
            # The channel went with the copy in flight. With one node the original comes back
            # with it; else it may not (`_may_stay_away`), so the copy is published again once
            # reconnected; if the original does come back, the task may run twice.
            if not self._may_stay_away(delivery):
                return
            task_id = delivery.headers.get(Header.TASK_ID)
            log.warning("giving task %s back as a copy failed (%s); publishing the copy again", task_id, exc)
            try:
                await publish_until_confirmed(
                    self.broker, topology.TASKS_EXCHANGE, routing_key, delivery.body, headers, f"task {task_id}"
                )
            except BrokerUnavailable as refused:
                log.error("task %s: its copy was refused (%s); it waits for its original to return", task_id, refused)
                return
        self.acks.done(delivery)  # no-op on a lost channel

    def _routing_key_of(self, delivery: Delivery) -> str:
        """Where a copy given back goes: the task's own work queue (TaskMessage.routing_key,
        by its priority and cpus), or the queue it came from if it does not decode."""
        try:
            return TaskMessage.decode(delivery.body).routing_key
        except ValueError:
            return self._queue_of[delivery.consumer_tag]

    async def _set_prefetch(self, tag: str, prefetch: int) -> None:
        try:
            await self.broker.set_prefetch(tag, prefetch)
        except BrokerUnavailable as exc:
            log.warning("prefetch change to %d deferred: %s", prefetch, exc)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain: stop consuming, give back unstarted deliveries (as copies: `_give_back`),
        let running tasks finish up to `drain_timeout_s`, then kill the rest and return them
        to the queue too (redelivered: their runs were cut short, so they count as suspects).
        Copies still unpublished after REPUBLISH_WAIT_S are left to RabbitMQ's requeue,
        except those whose originals may stay away: those are waited for."""
        self.draining = True
        self.pool.pipeline = False
        if self._held_check is not None:
            self._held_check.cancel()
        for tag in [*self._consumer_tags, *self._size_tags, self.control.tag]:
            try:
                await self.broker.cancel(tag)
            except BrokerUnavailable:
                pass  # disconnected: RabbitMQ requeues everything unacked anyway
        for handler in list(self._waiting):
            self._give_back(handler)
        running = [handler for handler in self._unsettled if not handler.done()]
        if running:
            log.info(
                "draining: waiting up to %s s for %d running task(s)",
                "unbounded" if drain_timeout_s is None else f"{drain_timeout_s:g}",
                len(running),
            )
            _done, late = await asyncio.wait(running, timeout=drain_timeout_s)
            if late:
                log.warning("drain timeout: killing %d running task(s); they return to the queue", len(late))
                for handler in late:
                    handler.cancel()
                await asyncio.wait(late)
        await self._background.wait(REPUBLISH_WAIT_S)
        await self._wait_for_only_copies()
        self.acks.flush()
        self.tally.flush()

    async def _wait_for_only_copies(self) -> None:
        """Copies still unpublished whose originals may stay away (`_may_stay_away`) may be
        their tasks' only way back to the queue: the drain waits for them as long as the
        broker is away, up to ONLY_COPIES_WAIT_S. A refusal that lasts ends one
        (`publish_until_confirmed`); a second signal stops at once."""
        pending = {copy: original for copy, original in self._copies.items() if self._may_stay_away(original)}
        if not pending:
            return
        log.warning(
            "draining: waiting up to %g s for RabbitMQ to take back %d task(s) given back on a channel that is "
            "gone (the broker may hold their originals until the node they were on returns); send the signal "
            "again to stop now and leave them to that node",
            ONLY_COPIES_WAIT_S,
            len(pending),
        )
        _done, late = await asyncio.wait(pending, timeout=ONLY_COPIES_WAIT_S)
        if late:
            log.error(
                "stopping with %d task(s) not taken back (%s): RabbitMQ stayed away; they run once the node "
                "that held them returns",
                len(late),
                ", ".join(str(pending[copy].headers.get(Header.TASK_ID)) for copy in late),
            )

    async def send_heartbeats(self, interval_s: float, types: list[str]) -> None:
        """Announce this worker to the servers every `interval_s` until cancelled."""
        while True:
            await self.send_heartbeat(types)
            await asyncio.sleep(interval_s)

    async def send_heartbeat(self, types: list[str], stopped: bool = False) -> None:
        beat = Heartbeat(
            self.worker_id,
            socket.gethostname(),
            os.getpid(),
            self.pool.procs,
            self.busy,
            tuple(self.queues),
            tuple(types),
            qm.__version__,
            self.draining,
            stopped,
            busy_cpus=self.pool.busy_cpus,
            features=(Feature.BUNDLES,),
        )
        try:
            await self.broker.publish(topology.HEARTBEATS_EXCHANGE, "", beat.encode(), {Header.WORKER: self.worker_id})
        except BrokerUnavailable:
            pass  # the next one, once reconnected, says the same

    async def abort(self) -> None:
        """Second signal: kill every running task and return all deliveries to the queue now."""
        self.draining = True
        self.pool.pipeline = False
        handlers = [handler for handler in self._unsettled if not handler.done()]
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers)

    @property
    def busy(self) -> int:
        """Children running a task."""
        return self.pool.busy

    @property
    def committed(self) -> int:
        """Deliveries a child has: running, or queued in its pipe behind a running one."""
        return len(self._unsettled) - len(self._waiting)

    @property
    def unacked(self) -> int:
        return len(self._unsettled)


async def _confirmed(done: Awaitable[None]) -> None:
    """Wait for an event handed over (its publish runs without this)."""
    await done
