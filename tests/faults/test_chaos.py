"""Scenario 7 (issue #15, part 1): chaos. Waves of mixed tasks (succeeding, sleeping,
failing for good, failing once then succeeding after a delayed retry, timing out) while,
in turn, a worker is killed -9 and replaced, pool children are killed -9, the server is
killed -9 and restarted on its data dir and port, and RabbitMQ is stopped and started,
then SIGKILLed and started. Each of these takes down what a task is doing at that moment,
and the RabbitMQ outages come while tasks wait for a retry in the delay tiers.

Every accepted task must end in exactly the terminal state its kind implies, whatever
hit it: a task redelivered after its worker died runs again to the same end; a child
killed under a sleeping task costs it one retry of its budget (max_retries 3: kills here
cannot use it up); a flaky task's failure counter is a file of its own, so a run repeated
by a redelivery only makes it succeed sooner. 0 lost is the assertion; the counts per
kind (accepted, expected state reached, lost or stuck, wrong, retried, duplicates
executed) are printed in the fault-injection summary.

Against the code before issue #15 this lost tasks that waited for a retry during an
outage (support.RETRY_LOST): they stayed RETRYING.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time
import uuid

import pytest

import qm
from qm.client.client import TaskStatus
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
    Spec,
    StatusProbe,
    TasksNotFinished,
    Watcher,
    check_and_report,
    counts_by_kind,
    print_kinds,
    statuses,
    submit_all,
    tails,
    unfinished,
    wait_dead_letters,
    wait_settled,
)
from tests.processes import Process, gone, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

#: Tasks of each kind in one wave (a wave is submitted before each fault, and one after).
SUCCEEDING, SLEEPING, FAILING, FLAKY, TIMING_OUT = 24, 6, 10, 14, 6
#: Retry budget of the kinds a kill must not change the end of: a killed child costs one.
KILL_BUDGET = {"max_retries": 3, "retry_backoff_s": 0.0, "retry_on_timeout": False}
#: Retry delays of the flaky tasks (each its own delay tier): they wait in RabbitMQ.
FLAKY_DELAYS_S = (1.0, 2.0, 5.0)
#: What test.flaky returns (the run number grows if a run was repeated by a redelivery).
SUCCEEDED_ON_A_RUN = re.compile(r"succeeded on run \d+")
#: Pool children killed under sleeping tasks, and how far into its one-second sleep the
#: task may be at most (so the kill certainly cuts it off).
CHILD_KILLS = 2
MAX_AGE_AT_KILL_S = 0.5
#: How long the server, and RabbitMQ, stay down.
SERVER_DOWN_S = 2.0
BROKER_DOWN_S = 6.0
#: Tasks waiting for a retry (RETRYING) when RabbitMQ goes down, at least.
WAITING_AT_OUTAGE = 4
#: Reconnect backoff cap for this test's processes (a real setting).
FAST_RECONNECT = {"QM_BROKER__RECONNECT_MAX_DELAY_S": "1"}
#: Bounds: one fault's precondition (a busy worker, a sleeping task running, ...); the
#: processes reconnecting to RabbitMQ; a submit retrying while the server or RabbitMQ is
#: coming back; a watch stream (it outlives every fault); dead letters being listed.
FAULT_TIMEOUT_S = 60.0
RECONNECT_TIMEOUT_S = 60.0
SUBMIT_RETRY_S = 60.0
WATCH_TIMEOUT_S = 400.0
DEAD_LETTERS_TIMEOUT_S = 20.0
#: No task finishing for this long after the last fault: the rest are lost.
STALL_S = 30.0


def wave(number: int, counter_dir) -> list[Spec]:
    """One wave of every kind, shuffled (the same way for the same wave number)."""
    run = f"{uuid.uuid4().hex[:6]}-w{number}"
    specs: list[Spec] = []

    def add(kind: str, type_: str, payload: str, expected, state: str = "SUCCEEDED", **options) -> None:
        specs.append(Spec(type_, payload, expected, f"{run}-{len(specs)}", state=state, kind=kind,
                          options=options))

    for i in range(SUCCEEDING):
        if i % 2:
            token = f"echo-{run}-{i}"
            add("succeeding", "test.echo", token, token, **KILL_BUDGET)
        else:
            add("succeeding", "math", f"{i} * 7 + {number}", str(i * 7 + number), **KILL_BUDGET)
    for _ in range(SLEEPING):
        add("sleeping", "test.sleep", "1", "1", **KILL_BUDGET)
    for i in range(FAILING):  # half without retries, half with one (a delayed one)
        retries = {"max_retries": 1, "retry_backoff_s": 1.0, "retry_jitter": False} if i % 2 else {}
        add("failing", "test.fail", f"failing {run}-{i}", None, "FAILED", **{"max_retries": 0, **retries})
    for i in range(FLAKY):
        path = counter_dir / f"flaky-{run}-{i}"
        add("flaky", "test.flaky", f"{path}:1", SUCCEEDED_ON_A_RUN, max_retries=5,
            retry_backoff_s=FLAKY_DELAYS_S[i % len(FLAKY_DELAYS_S)], retry_jitter=False)
    for i in range(TIMING_OUT):  # qm.SoftTimeout left uncaught (sleep), or the hard kill (stubborn)
        stubborn = i % 3 == 0
        add("timing out", "test.stubborn" if stubborn else "test.sleep", "60", None, "TIMED_OUT",
            timeout_s=1.0, soft_timeout_s=0.0 if stubborn else 0.5, **KILL_BUDGET)
    random.Random(number).shuffle(specs)
    return specs


class Chaos:
    """The cluster under test (one server, workers of 2 children each, the private
    RabbitMQ node), the tasks accepted so far and one resuming watch stream per wave."""

    def __init__(self, node, launcher, counter_dir) -> None:
        self.node, self.launcher, self.counter_dir = node, launcher, counter_dir
        self.queue = launcher.queue(node.url)
        launcher.forget_queues(node.url)  # the private node is gone before teardown
        self.servers = [launcher.server(node.url, env=FAST_RECONNECT)]
        self.workers = [self._start_worker(), self._start_worker()]
        self.client = qm.Client(self.server.address, submit_retry_s=SUBMIT_RETRY_S)
        self.accepted: dict[str, Spec] = {}
        self.watchers: list[Watcher] = []
        self.waiting_at_outages: set[str] = set()  # RETRYING when RabbitMQ went down
        self.killed: list[Process] = []  # by the test, on purpose
        self.facts: dict[str, object] = {}

    @property
    def server(self) -> Process:
        return self.servers[-1]

    @property
    def processes(self) -> list[Process]:
        return [*self.workers, *self.servers]

    def live(self) -> list[Process]:
        return [process for process in self.processes if process.alive()]

    def _start_worker(self) -> Process:
        return self.launcher.worker(self.node.url, procs=2, queues=self.queue, env=FAST_RECONNECT)

    def submit_wave(self) -> None:
        accepted = submit_all(self.client, wave(len(self.watchers) + 1, self.counter_dir), self.queue)
        self.accepted.update(accepted)
        self.watchers.append(Watcher(self.server.address, accepted, timeout_s=WATCH_TIMEOUT_S, resume=True))

    def last_states(self) -> dict[str, str]:
        return {task_id: watcher.last_state(task_id)
                for watcher in self.watchers for task_id in watcher.task_ids}

    # -- the faults ------------------------------------------------------------------

    def kill_a_worker(self) -> None:
        """kill -9 of a worker supervisor while it runs tasks; a new worker takes its place."""
        doomed = next(worker for worker in self.workers if worker.alive())
        probe = StatusProbe(doomed)
        running = wait_until(probe.busy, FAULT_TIMEOUT_S, interval_s=0.05,
                             message="the doomed worker running tasks")
        probe.close()
        family = doomed.descendants()
        doomed.kill()
        self.killed.append(doomed)
        self.workers.append(self._start_worker())
        wait_until(lambda: all(gone(process) for process in family), FAULT_TIMEOUT_S,
                   message=f"children {[p.pid for p in family]} of the killed worker ending")
        self.facts["running_on_killed_worker"] = len(running)

    def kill_children(self) -> None:
        """kill -9 of pool children, each while it runs a sleeping task with some way to go."""
        sleeping = {task_id for task_id, spec in self.accepted.items() if spec.kind == "sleeping"}
        probes = [StatusProbe(worker) for worker in self.workers if worker.alive()]
        killed: dict[str, int] = {}

        def target():
            return next(((pid, task_id) for probe in probes for pid, task_id, _type, age in probe.busy()
                         if task_id in sleeping and task_id not in killed and age < MAX_AGE_AT_KILL_S), None)

        try:
            while len(killed) < CHILD_KILLS:
                pid, task_id = wait_until(target, FAULT_TIMEOUT_S, interval_s=0.05,
                                          message="a sleeping task just started")
                os.kill(pid, signal.SIGKILL)
                killed[task_id] = pid
        finally:
            for probe in probes:
                probe.close()
        self.facts["children_killed"] = len(killed)

    def kill_the_server(self) -> None:
        """kill -9 of qm-server, restarted after a pause with its id, data dir and port."""
        killed = self.server
        killed.kill()
        self.killed.append(killed)
        time.sleep(SERVER_DOWN_S)  # the fault itself: workers go on, their events wait in RabbitMQ
        self.servers.append(self.launcher.server(
            self.node.url, server_id=killed.server_id, env=FAST_RECONNECT,
            extra_args=["--listen", f"127.0.0.1:{killed.port}"]))
        assert self.server.port == killed.port and self.server.data_dir == killed.data_dir

    def rabbitmq_outage(self, how: str) -> None:
        """RabbitMQ stopped (gracefully) or SIGKILLed while tasks wait for a retry in it,
        down for longer than their delays, then started; everything reconnects by itself."""
        def retrying() -> set[str]:
            return {task_id for task_id, state in self.last_states().items() if state == "RETRYING"}

        wait_until(lambda: len(retrying()) >= WAITING_AT_OUTAGE, FAULT_TIMEOUT_S, interval_s=0.02,
                   message=f"{WAITING_AT_OUTAGE} tasks waiting for a retry")
        live = self.live()
        marks = {process: process.line_count() for process in live}
        waiting = retrying()
        getattr(self.node, how)()  # stop(): graceful; kill(): SIGKILL of the node
        time.sleep(BROKER_DOWN_S)  # the fault itself: the node stays down while the delays end
        self.node.start()
        for process in live:
            process.wait_for_line(r"connected to RabbitMQ", RECONNECT_TIMEOUT_S, start=marks[process])
        self.waiting_at_outages |= waiting
        self.facts[f"waiting_at_rabbitmq_{how}"] = len(waiting)

    # -- the end -----------------------------------------------------------------------

    def settle(self, name: str) -> dict[str, TaskStatus]:
        """Every accepted task's final status, once all are terminal (bounded)."""
        marked = {"waiting_at_outage": self.waiting_at_outages}
        try:
            wait_settled(self.watchers, SETTLE_TIMEOUT_S, self.processes, stall_s=STALL_S)
        except TasksNotFinished as stuck:
            raise unfinished(name, self.accepted, statuses(self.client, self.accepted), self.workers, stuck,
                             marked) from None
        final = statuses(self.client, self.accepted)
        print_kinds(name, counts_by_kind(self.accepted, final, self.workers, marked))
        return final

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.close()
        self.client.close()


def test_chaos_of_kills_and_rabbitmq_outages(own_rabbitmq, launcher, tmp_path):
    name = "chaos"
    chaos = Chaos(own_rabbitmq, launcher, tmp_path)
    try:
        for fault in (chaos.kill_a_worker, chaos.kill_children, chaos.kill_the_server,
                      lambda: chaos.rabbitmq_outage("stop"), lambda: chaos.rabbitmq_outage("kill")):
            chaos.submit_wave()
            fault()
        chaos.submit_wave()
        final = chaos.settle(name)
        ended_badly = {task_id for task_id, spec in chaos.accepted.items() if spec.state != "SUCCEEDED"}
        dead = wait_dead_letters(chaos.client, ended_badly, DEAD_LETTERS_TIMEOUT_S) & set(chaos.accepted)
    finally:
        chaos.close()

    facts = {**chaos.facts, "waves": len(chaos.watchers), "dead_letters": len(dead),
             "watch_streams_resumed": sum(watcher.resumed for watcher in chaos.watchers),
             "worker_reconnects": sum(w.stderr.count("lost connection to RabbitMQ") for w in chaos.workers)}
    check_and_report(name, chaos.accepted, chaos.watchers, final, chaos.workers, logs_of=chaos.servers,
                     extra=facts)
    # Every task that failed or timed out for good is in the dead letters; none that succeeded.
    assert sorted(ended_badly - dead) == [], f"tasks missing from the dead letters\n{tails(chaos.live())}"
    assert sorted(dead - ended_badly) == [], "tasks that succeeded are listed as dead letters"
    assert all(process.alive() for process in chaos.processes if process not in chaos.killed), \
        tails(chaos.processes)
