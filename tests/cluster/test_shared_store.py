"""Two qm-servers on one PostgreSQL store, with real faults (issue 13, item 4).

Every scenario runs two real `qm-server --store-url postgresql://...` processes (own ids,
own data dirs, one database), a real `qm-worker`, a private PostgreSQL
(qm.testing.postgres) and the session's RabbitMQ node. Each checks what a user would
notice, and prints its counts like the fault suite ("[faults] ..."): accepted,
succeeded, duplicates executed, and lost = accepted tasks that never reached a terminal
state (always 0, or the scenario fails).

- kill -9 of one server mid-run: the other serves every task's status and stream, for
  the tasks submitted through either;
- the same idempotency key submitted at once to both servers: one task;
- a dead letter made through one server is listed and requeued through the other, once;
- PostgreSQL restarted mid-run: submits fail UNAVAILABLE naming PostgreSQL while it is
  down, the client's retry rides it out, nothing is lost, no QueueMaster process restarts.
"""
from __future__ import annotations

import re
import threading
import time
import types

import grpc
import pytest

import qm
from qm.client.client import RemoteError
from qm.testing.postgres import LocalPostgres
from tests.faults.support import (
    SETTLE_TIMEOUT_S,
    Spec,
    Watcher,
    check_and_report,
    mixed_workload,
    statuses,
    submit_all,
    wait_dead_letters,
    wait_settled,
)
from tests.postgres_fixtures import fresh_database, own_postgres, postgres  # noqa: F401  (fixtures)
from tests.processes import Launcher, Process, Server, wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.processes, pytest.mark.faults,
              pytest.mark.slow,
              pytest.mark.timeout(240)]

STORE_READY = re.compile(r"task store: PostgreSQL \S+ \(store id (?P<store_id>\S+),")
#: How long a client keeps retrying a submit (same key) while a server or the store is away.
SUBMIT_RETRY_S = 60.0
#: How long the PostgreSQL outage lasts at least (probed meanwhile).
DOWN_S = 2.0
#: Tasks held running across the PostgreSQL outage.
GATED = 4


def start_pair(launcher: Launcher, broker_url: str, store_url: str, queue: str,
               procs: int = 2) -> types.SimpleNamespace:
    """Two servers on one store and a worker; the store's shared queues are deleted in teardown."""
    servers = [launcher.server(broker_url, extra_args=["--store-url", store_url]) for _ in range(2)]
    store_id = servers[0].wait_for_line(STORE_READY, 10.0)["store_id"]
    assert servers[1].wait_for_line(STORE_READY, 10.0)["store_id"] == store_id  # one store, one id
    for name in (f"qm.events.{store_id}", f"qm.dead.{store_id}"):
        launcher.track_queue(broker_url, name)
    worker = launcher.worker(broker_url, procs=procs, queues=queue)
    return types.SimpleNamespace(a=servers[0], b=servers[1], worker=worker, queue=queue, store_id=store_id)


@pytest.fixture(scope="module")
def pair(rabbitmq, postgres, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """One pair of servers and a worker for the scenarios below that do not restart
    PostgreSQL (starting three processes costs more than any of them): each uses its own
    task ids, keys and dead letters, and the kill -9 scenario comes last in the file."""
    launcher = Launcher(tmp_path_factory.mktemp("pair"))
    try:
        yield start_pair(launcher, rabbitmq.url, fresh_database(postgres), launcher.queue(rabbitmq.url))
    finally:
        launcher.cleanup()


class LogsFrom:
    """A process's log from now on: what the fault suite's checks read (`stderr`, `name`,
    `pid`, `alive`), so a scenario on the shared pair counts only its own executions."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.name = process.name
        self.pid = process.pid
        self._start = process.line_count()

    @property
    def stderr(self) -> str:
        return "\n".join(self.process.stderr.splitlines()[self._start:])

    def alive(self) -> bool:
        return self.process.alive()


def client_of(*servers: Server, **options) -> qm.Client:
    return qm.Client(",".join(server.address for server in servers), **options)


def test_one_idempotency_key_submitted_to_both_servers_at_once_is_one_task(pair):
    worker = LogsFrom(pair.worker)
    specs = mixed_workload(20, sleep_every=100)
    ids: dict[str, list[str]] = {spec.key: [] for spec in specs}
    errors: list[BaseException] = []
    clients = [client_of(pair.a), client_of(pair.b)]
    start = threading.Barrier(len(clients))

    def submit_everything(client: qm.Client) -> None:
        try:
            start.wait(30.0)
            for spec in specs:
                ids[spec.key].append(client.submit(spec.type, spec.payload, queue=pair.queue,
                                                   idempotency_key=spec.key))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit_everything, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120.0)
    try:
        assert not errors, errors
        assert all(len(set(got)) == 1 and len(got) == 2 for got in ids.values()), ids
        accepted: dict[str, Spec] = {got[0]: spec for spec, got in zip(specs, ids.values(), strict=True)}
        watcher = Watcher(pair.a.address, accepted)
        wait_settled(watcher, SETTLE_TIMEOUT_S, [pair.a, pair.b, pair.worker])
        final = statuses(clients[1], accepted)
    finally:
        for client in clients:
            client.close()
    counts = check_and_report("shared store: one key at both servers", accepted, watcher, final, [worker],
                              logs_of=[pair.a, pair.b],
                              extra={"submits": 2 * len(specs), "lost": _lost(final)})
    assert counts["duplicates_executed"] == 0


def test_a_dead_letter_made_through_one_server_is_requeued_through_the_other_once(pair):
    with client_of(pair.a) as via_a, client_of(pair.b) as via_b:
        failing = via_a.submit("test.fail", "dead on arrival", queue=pair.queue, max_retries=0)
        assert via_a.status(failing).state in {"QUEUED", "RUNNING", "FAILED"}
        [final] = list(via_a.results([failing], timeout_s=60.0))
        assert final.state == "FAILED"
        assert failing in wait_dead_letters(via_b, [failing], 30.0)  # one table: listed through B

        renamed = via_b.requeue_dead_letters([failing])
        assert list(renamed) == [failing]
        rerun = renamed[failing]
        listed_on_a = {letter.task_id for letter in via_a.dead_letters(limit=1000)[0]}
        assert failing not in listed_on_a  # gone for both servers: requeued once
        with pytest.raises(RemoteError) as refused:
            via_a.requeue_dead_letters([failing])
        assert refused.value.code is grpc.StatusCode.NOT_FOUND

        [again] = list(via_a.results([rerun], timeout_s=60.0))  # the new task ran, through B's requeue
        assert again.state == "FAILED" and again.attempts == 1
        letters = wait_dead_letters(via_a, [rerun], 30.0)
        assert rerun in letters and failing not in letters
        _letters, total = via_b.dead_letters(limit=1000)
        assert total == 1  # the requeued task's new dead letter, and nothing else

        # The same letter requeued through both servers at the same moment: one new task.
        both_at_once = threading.Barrier(2)
        renamings: list[dict[str, str]] = []

        def requeue_through(client: qm.Client) -> None:
            both_at_once.wait(30.0)
            try:
                renamings.append(client.requeue_dead_letters([rerun]))
            except RemoteError as exc:  # the other server took it before this one looked
                assert exc.code is grpc.StatusCode.NOT_FOUND, exc
                renamings.append({})

        racers = [threading.Thread(target=requeue_through, args=(client,)) for client in (via_a, via_b)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(60.0)
        made = [new for renaming in renamings for new in renaming.values()]
        assert len(renamings) == 2 and len(made) == 1, renamings
        [third] = list(via_b.results(made, timeout_s=60.0))
        assert third.state == "FAILED"
    print(f"\n[faults] shared store: dead letter across servers: dead={failing}, requeued_as={rerun}, "
          f"dead_letters_after_first_requeue={total}, new_tasks_from_a_racing_requeue={len(made)}", flush=True)


def test_groups_finished_by_two_servers_call_back_once_each(pair, tmp_path):
    """Both servers apply the members' events (competing consumers of the store's events
    queue): the database decides which transaction counts each group's last member, so
    every callback is made once, whichever server saw it."""
    log = tmp_path / "callbacks.log"
    groups = {}
    with qm.Client(pair.a.address) as via_a, qm.Client(pair.b.address) as via_b:
        for number in range(8):
            client = (via_a, via_b)[number % 2]
            items = [("test.echo", str(member)) for member in range(25)]
            group_id = client.submit_group(items, then=("test.group_record", {"log": str(log)}), queue=pair.queue)
            groups[group_id] = client
        for group_id, client in groups.items():
            other = via_b if client is via_a else via_a  # the group is seen through either server
            list(other.results(other.group_status(group_id).task_ids, timeout_s=SETTLE_TIMEOUT_S))
            callback = other.result(other.group_status(group_id).callback_task_id, timeout_s=SETTLE_TIMEOUT_S)
            assert callback["results"] == [str(member) for member in range(25)], group_id
    runs = [line.split('"group_id": "')[1].split('"')[0] for line in log.read_text().splitlines()]
    assert sorted(runs) == sorted(groups), f"callback runs {runs}"
    made = [server.stderr.count("every member finished; callback") for server in (pair.a, pair.b)]
    print(f"[faults] groups on two servers: {len(groups)} groups, callbacks made by server a {made[0]}, "
          f"by b {made[1]}")
    assert sum(made) == len(groups)


def test_kill_9_of_one_server_mid_run_the_other_serves_every_task(pair):
    worker = LogsFrom(pair.worker)
    specs = mixed_workload(60, sleep_every=6)
    with client_of(pair.a, submit_retry_s=SUBMIT_RETRY_S) as via_a, \
            client_of(pair.b, submit_retry_s=SUBMIT_RETRY_S) as via_b:
        accepted = {**submit_all(via_a, specs[0::2], pair.queue), **submit_all(via_b, specs[1::2], pair.queue)}
        # Follows every task through B alone, those submitted through A too: their changes are
        # applied by whichever server took the event, and reach B's stream either way.
        watcher = Watcher(pair.b.address, accepted)
        wait_until(lambda: watcher.terminal_count() >= 10, 60.0, message="10 tasks finished")
        killed_mid_run = len(accepted) - watcher.terminal_count()
        assert pair.a.kill() == -9
        wait_settled(watcher, SETTLE_TIMEOUT_S, [pair.b, pair.worker])
        final = statuses(via_b, accepted)
    counts = check_and_report("shared store: kill -9 of one server", accepted, watcher, final, [worker],
                              logs_of=[pair.a, pair.b],
                              extra={"open_when_killed": killed_mid_run, "lost": _lost(final)})
    assert killed_mid_run > 0, "every task finished before the kill: the scenario proved nothing"
    assert counts["succeeded"] == len(accepted)


def test_a_postgresql_restart_mid_run_is_ridden_out(rabbitmq, launcher, gates, own_postgres):  # noqa: F811
    pg: LocalPostgres = own_postgres
    pair = start_pair(launcher, rabbitmq.url, fresh_database(pg), launcher.queue(rabbitmq.url), procs=GATED + 1)
    # Tasks held running across the outage, followed through B only: their last events are
    # applied after PostgreSQL is back, by A or B (competing consumers), so B's streams see
    # A's changes only if B's change listener connected again (about 1 in 2**GATED that B
    # applies all of them itself).
    gate = gates()
    with client_of(pair.a) as via_a:
        gated = {via_a.submit("test.wait_for", gate.payload, queue=pair.queue): Spec(
            "test.wait_for", gate.payload, gate.payload, f"gated-{i}") for i in range(GATED)}
        wait_until(lambda: all(via_a.status(task_id).state == "RUNNING" for task_id in gated), 60.0,
                   message="the gated tasks running")
    held = Watcher(pair.b.address, gated)
    specs = mixed_workload(80, sleep_every=10, sleep_s="0.5")
    accepted: dict[str, Spec] = {}
    submit_errors: list[BaseException] = []

    def submit_steadily() -> None:
        try:
            with client_of(pair.a, pair.b, submit_retry_s=SUBMIT_RETRY_S) as client:
                for spec in specs:
                    accepted[client.submit(spec.type, spec.payload, queue=pair.queue,
                                           idempotency_key=spec.key)] = spec
        except BaseException as exc:
            submit_errors.append(exc)

    submitter = threading.Thread(target=submit_steadily, name="submitter")
    submitter.start()
    wait_until(lambda: len(accepted) >= 30 or submit_errors, 60.0, message="30 tasks accepted")
    pg.stop()  # a fast shutdown: every session is cut
    accepted_when_down = len(accepted)
    down_at = time.monotonic()
    with client_of(pair.b, submit_retry_s=0.0) as impatient:
        with pytest.raises(RemoteError) as refused:
            impatient.submit("test.echo", "while the store is down", queue=pair.queue)
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "STORE_UNAVAILABLE", refused.value
    assert "PostgreSQL store" in refused.value.details, refused.value.details
    time.sleep(max(0.0, DOWN_S - (time.monotonic() - down_at)))  # keep the outage DOWN_S long at least
    pg.start()
    submitter.join(SUBMIT_RETRY_S + 60.0)
    assert not submitter.is_alive() and not submit_errors, submit_errors
    assert len(accepted) == len(specs)
    gate.open()
    accepted.update(gated)
    wait_settled(held, SETTLE_TIMEOUT_S, [pair.a, pair.b, pair.worker])
    assert {task_id: [s.state for s in seen] for task_id, seen in held.terminal_updates().items()} == \
        {task_id: ["SUCCEEDED"] for task_id in gated}, "B's streams missed changes applied after the restart"

    watcher = Watcher(f"{pair.a.address},{pair.b.address}", accepted, resume=True)
    wait_settled(watcher, SETTLE_TIMEOUT_S, [pair.a, pair.b, pair.worker])
    with client_of(pair.a, pair.b) as client:
        final = statuses(client, accepted)
    alive = all(process.alive() for process in (pair.a, pair.b, pair.worker))
    counts = check_and_report("shared store: PostgreSQL restart", accepted, watcher, final, [pair.worker],
                              logs_of=[pair.a, pair.b],
                              extra={"accepted_before_outage": accepted_when_down, "lost": _lost(final),
                                     "held_across_outage": len(gated),
                                     "processes_restarted": 0 if alive else "some died"})
    assert alive, "a QueueMaster process died with the PostgreSQL restart"
    assert counts["succeeded"] == len(accepted) == len(specs) + GATED


def _lost(final: dict) -> int:
    return sum(1 for status in final.values() if not status.terminal)


def test_a_store_schema_newer_than_the_server_stops_it_at_start(rabbitmq, launcher, postgres):  # noqa: F811
    import asyncio

    import asyncpg

    from qm.server import pg_schema

    url = fresh_database(postgres)
    first = launcher.server(rabbitmq.url, extra_args=["--store-url", url])  # creates the schema
    first.wait_for_line(STORE_READY, 10.0)
    first.stop()

    async def as_if_a_newer_server_migrated_it() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("UPDATE qm_schema SET version = $1", pg_schema.SCHEMA_VERSION + 1)
        finally:
            await connection.close()

    asyncio.run(as_if_a_newer_server_migrated_it())
    refused = launcher.server(rabbitmq.url, extra_args=["--store-url", url], wait_ready=False)
    assert refused.wait(60.0) == 2
    assert f"schema version {pg_schema.SCHEMA_VERSION + 1}, newer than this QueueMaster knows" in refused.stderr
    assert "postgresql://postgres@127.0.0.1" in refused.stderr  # names the store
