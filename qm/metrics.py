"""Prometheus metrics of qm-server and qm-worker; the only module that imports prometheus_client.

Each process has its own registry and, with `--metrics-port N` (0 = off), serves it over
HTTP. Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`); label values
are bounded: task types come from installed plugins, states and methods are enums.
Values that already live in the process (busy children, prefetch, store size) are read
when scraped through callbacks, not copied on every change.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

#: Buckets for task run and wait times: CPU-heavy tasks run from milliseconds to an hour.
TASK_SECONDS_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600)
#: Buckets for RPC handling and publish confirms.
FAST_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
#: Buckets for a child's idle gap between two tasks (sub-millisecond is the norm).
GAP_SECONDS_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1)
#: Buckets for the task events one message on qm.events carries (a pack holds at most 64 KiB).
EVENTS_PER_MESSAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Buckets for the event loop's time in a store call (the budget is 100 us).
LOOP_SECONDS_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)
#: Buckets for the writes one store transaction carries.
WRITES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """What qm-server exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submissions = Counter(
            "qm_server_submissions_total",
            "Submissions by task type and outcome (accepted, duplicate, key_reused, invalid, unavailable)",
            ["type", "outcome"],
            registry=r,
        )
        self.rejects = Counter(
            "qm_server_validation_rejects_total", "Rejected submissions by the field at fault", ["field"], registry=r
        )
        self.rpc_seconds = Histogram(
            "qm_server_grpc_handling_seconds",
            "gRPC handling time by method and code",
            ["method", "code"],
            buckets=FAST_SECONDS_BUCKETS,
            registry=r,
        )
        self.grpc_refused = Counter(
            "qm_server_grpc_refused_total",
            "TaskQueue calls refused with "
            "RESOURCE_EXHAUSTED because server.max_concurrent_rpcs calls were in flight, "
            "by method",
            ["method"],
            registry=r,
        )
        self.rate_limited = Counter(
            "qm_server_rate_limited_total",
            "Submit calls refused with RESOURCE_EXHAUSTED "
            "by the per-caller rate limit (server.submit_rate_per_s), by method",
            ["method"],
            registry=r,
        )
        self.grpc_in_flight = Gauge(
            "qm_server_grpc_in_flight", "TaskQueue calls being handled (streams included)", registry=r
        )
        self.open_streams = Gauge("qm_server_open_streams", "StreamTaskResults streams open", registry=r)
        self.bundled_tasks = Counter(
            "qm_server_bundled_tasks_total",
            "Tasks published several to a work-queue message (bundles of tiny tasks: server.bundle_max_tasks)",
            registry=r,
        )
        self.groups = Counter(
            "qm_server_groups_total",
            "Task groups (SubmitGroup) by outcome: accepted, duplicate (a repeated key), key_reused (refused)",
            ["outcome"],
            registry=r,
        )
        self.group_members = Counter("qm_server_group_members_total", "Member tasks of accepted groups", registry=r)
        self.group_callbacks = Counter(
            "qm_server_group_callbacks_total",
            "Group callbacks made, by whether every member succeeded (all_succeeded, with_failures)",
            ["outcome"],
            registry=r,
        )
        self.group_seconds = Histogram(
            "qm_server_group_duration_seconds",
            "Time from a group's acceptance to its last member finishing (groups with a callback)",
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=r,
        )
        self.confirm_seconds = Histogram(
            "qm_server_publish_confirm_seconds",
            "Time from publish to RabbitMQ's confirm of a submitted task",
            buckets=FAST_SECONDS_BUCKETS,
            registry=r,
        )
        self.events_lag_seconds = Histogram(
            "qm_server_events_lag_seconds",
            "Age of task events when applied to the store",
            buckets=FAST_SECONDS_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            "qm_server_events_total",
            "Task events applied, by state (PROGRESS: progress reports)",
            ["state"],
            registry=r,
        )
        self.progress_ignored = Counter(
            "qm_server_progress_ignored_total",
            "Progress reports ignored: the task was terminal, in another attempt, or unknown",
            registry=r,
        )
        self.dead_letters = Counter("qm_server_dead_letters_total", "Tasks dead-lettered", ["type"], registry=r)
        self.reconciled = Counter(
            "qm_server_reconciled_total",
            "Tasks published again by the reconciler because their message looked lost, by the state they were in",
            ["state"],
            registry=r,
        )
        for state in ("QUEUED", "RUNNING", "RETRYING"):
            self.reconciled.labels(state)  # present from the start, so rate() sees the first
        self.schedule_fires = Counter(
            "qm_server_schedule_fires_total",
            "Ticks of periodic schedules fired by this server, by task type and outcome "
            "(fired: a task was submitted; refused: the task was refused, see the schedule's last_error)",
            ["type", "outcome"],
            registry=r,
        )
        self.schedule_ticks_missed = Counter(
            "qm_server_schedule_ticks_missed_total",
            "Ticks of periodic schedules that fired no task of their own because no server got to them "
            "in time, by the schedule's missed-ticks policy (coalesce: folded into a later tick; skip: dropped)",
            ["policy"],
            registry=r,
        )
        for policy in ("coalesce", "skip"):
            self.schedule_ticks_missed.labels(policy)
        self.schedule_fire_lateness_seconds = Histogram(
            "qm_server_schedule_fire_lateness_seconds",
            "Time from a schedule's tick to its task being fired (coalesced ticks: from the latest)",
            buckets=TASK_SECONDS_BUCKETS,
            registry=r,
        )
        self.store_schedules = Gauge("qm_server_store_schedules", "Periodic schedules in the store", registry=r)
        self.store_tasks = Gauge("qm_server_store_tasks", "Tasks in this server's store", registry=r)
        self.store_dead_letters = Gauge(
            "qm_server_store_dead_letters", "Dead letters in this server's store", registry=r
        )
        self.store_loop_seconds = Histogram(
            "qm_server_store_loop_seconds",
            "Event-loop time of one store call (point reads; writes run on the writer thread), by call",
            ["call"],
            buckets=LOOP_SECONDS_BUCKETS,
            registry=r,
        )
        self.store_transaction_writes = Histogram(
            "qm_server_store_transaction_writes",
            "Writes (submits, event batches, confirm marks, ...) one store transaction committed",
            buckets=WRITES_BUCKETS,
            registry=r,
        )
        self.store_transaction_seconds = Histogram(
            "qm_server_store_transaction_seconds",
            "Time of one store transaction on the writer thread, commit included",
            buckets=FAST_SECONDS_BUCKETS,
            registry=r,
        )

    def store_loop_call(self, call: str, seconds: float) -> None:
        self.store_loop_seconds.labels(call).observe(seconds)

    def store_transaction(self, writes: int, seconds: float) -> None:
        self.store_transaction_writes.observe(writes)
        self.store_transaction_seconds.observe(seconds)


class WorkerMetrics:
    """What qm-worker exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks_finished = Counter(
            "qm_worker_tasks_finished_total",
            "Attempts finished by task type and state (RETRYING = retried)",
            ["type", "state"],
            registry=r,
        )
        self.run_seconds = Histogram(
            "qm_worker_task_run_seconds", "Task run time by type", ["type"], buckets=TASK_SECONDS_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "qm_worker_task_queue_wait_seconds",
            "Time from enqueue (a delayed task: from its due time) to start, by type and priority (0-9)",
            ["type", "priority"],
            buckets=TASK_SECONDS_BUCKETS,
            registry=r,
        )
        self.delay_hops = Counter(
            "qm_worker_delay_hops_total",
            "Delayed tasks that came before their due time and were sent on to a delay tier, by tier",
            ["tier_s"],
            registry=r,
        )
        self.child_idle_gap_seconds = Histogram(
            "qm_worker_child_idle_gap_seconds",
            "A child's idle time between the end of one task and "
            "the start of the next, observed only when that next task was already waiting for a child",
            buckets=GAP_SECONDS_BUCKETS,
            registry=r,
        )
        self.events_per_message = Histogram(
            "qm_worker_events_per_message",
            "Task events in each message the worker published on qm.events for its outcomes and starts "
            "(1: alone; more: a pack, qm/worker/event_packs.py); sum / count is the mean",
            buckets=EVENTS_PER_MESSAGE_BUCKETS,
            registry=r,
        )
        self.kills = Counter(
            "qm_worker_kills_total",
            "Children killed or lost, by reason (timeout, memory, crash, cancel)",
            ["reason"],
            registry=r,
        )
        self.children_busy = Gauge("qm_worker_children_busy", "Children running a task", registry=r)
        self.children_idle = Gauge("qm_worker_children_idle", "Children waiting for a task", registry=r)
        self.child_rss_bytes = Gauge(
            "qm_worker_child_rss_bytes", "RSS of each child with its descendants, as last sampled", ["slot"], registry=r
        )
        self.prefetch = Gauge("qm_worker_prefetch", "Current prefetch per consumed queue", registry=r)
        self.busy_cpus = Gauge(
            "qm_worker_busy_cpus", "CPU slots held by running tasks (a task with cpus N holds N)", registry=r
        )
        self.cpus = Gauge("qm_worker_cpus", "CPU slots of this worker (--procs)", registry=r)
        self.unacked = Gauge("qm_worker_unacked_deliveries", "Deliveries held and not yet acked", registry=r)
        for reason in ("timeout", "memory", "crash", "cancel"):
            self.kills.labels(reason)  # present from the start, so rate() sees the first kill
        self.progress_events = Counter(
            "qm_worker_progress_events_total", "Progress events published (at most 10 a second per task)", registry=r
        )
        self.progress_dropped = Counter(
            "qm_worker_progress_dropped_total",
            "Progress updates not published, "
            "by reason (rate_limit: a later one replaced it within 0.1 s; ended: "
            "the task ended first; broker: RabbitMQ was away)",
            ["reason"],
            registry=r,
        )
        for reason in ("rate_limit", "ended", "broker"):
            self.progress_dropped.labels(reason)
        self._counters = _CallbackCounters()
        r.register(self._counters)

    def watch(
        self,
        *,
        busy: Callable[[], float],
        idle: Callable[[], float],
        restarts: Callable[[], float],
        prefetch: Callable[[], float],
        unacked: Callable[[], float],
        reconnects: Callable[[], float],
        busy_cpus: Callable[[], float] = lambda: 0.0,
        cpus: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.busy_cpus.set_function(busy_cpus)
        self.cpus.set_function(cpus)
        self.children_busy.set_function(busy)
        self.children_idle.set_function(idle)
        self.prefetch.set_function(prefetch)
        self.unacked.set_function(unacked)
        self._counters.sources = {
            "qm_worker_child_restarts": ("Children replaced after dying", restarts),
            "qm_worker_broker_reconnects": ("Reconnections to RabbitMQ", reconnects),
        }


class _CallbackCounters:
    """Counters whose values the process already keeps (pool restarts, broker connections),
    read at scrape time and exposed with the _total suffix of a counter."""

    def __init__(self) -> None:
        self.sources: dict[str, tuple[str, Callable[[], float]]] = {}

    def collect(self):
        for name, (documentation, read) in self.sources.items():
            yield CounterMetricFamily(name, documentation, value=read())


def serve(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> int:
    """Serve a registry on /metrics in a background thread; return the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
