"""Dead letters: tasks that failed for good are listed with why (API and `qm dead list`),
can be run again as new tasks (`requeue`) or forgotten (`purge`); and a task that kills
its whole worker every time is stopped by the quorum queue's delivery limit, recorded
CRASHED and dead-lettered, while the other tasks of its queue still run."""
from __future__ import annotations

import json
import types

import grpc
import pytest

import qm
from qm.client.client import RemoteError
from tests.processes import run_qm, wait_until

#: Bound on one task (all its attempts) reaching a terminal state.
RESULT_TIMEOUT_S = 90.0
#: Bound on a dead letter reaching the server's list after its task ended.
DEAD_LETTER_TIMEOUT_S = 30.0
#: Bound on a worker being killed by the task it took (start-up, delivery, the kill).
WORKER_DEATH_TIMEOUT_S = 60.0
#: At most this many workers are sacrificed to the worker-killing task.
MAX_DOOMED_WORKERS = 5


@pytest.fixture
def make_stack(rabbitmq, launcher):
    """make_stack(procs=2, env=None, worker=True): a server (and a worker) on a queue of
    this test's own; the same env for both; `.client` is a qm.Client of the server."""
    clients: list[qm.Client] = []

    def make(procs: int = 2, env: dict[str, str] | None = None, worker: bool = True) -> types.SimpleNamespace:
        queue = launcher.queue(rabbitmq.url)
        server = launcher.server(rabbitmq.url, env=env)
        launcher.track_queue(rabbitmq.url, f"qm.dead.{server.server_id}")
        started = launcher.worker(rabbitmq.url, procs=procs, queues=queue, env=env) if worker else None
        client = qm.Client(server.address)
        clients.append(client)
        return types.SimpleNamespace(server=server, worker=started, queue=queue, client=client, env=env)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def stack(make_stack):
    return make_stack()


def finish(client: qm.Client, *task_ids: str) -> dict[str, qm.client.client.TaskStatus]:
    """Follow the tasks until all are terminal (bounded); their final statuses by id."""
    last = {}
    for status in client.watch(list(task_ids), timeout_s=RESULT_TIMEOUT_S):
        last[status.task_id] = status
    assert all(status.terminal for status in last.values()) and len(last) == len(task_ids), last
    return last


def dead_letters_of(client: qm.Client, *task_ids: str) -> dict:
    """Wait until all these tasks are listed as dead letters; those letters by id."""
    def listed():
        letters, _total = client.dead_letters(limit=1000)
        mine = {letter.task_id: letter for letter in letters if letter.task_id in task_ids}
        return mine if len(mine) == len(task_ids) else None

    return wait_until(listed, DEAD_LETTER_TIMEOUT_S, message=f"dead letters for {task_ids}")


def logs(stack, *more) -> str:
    return "\n".join(process.logs for process in (stack.server, stack.worker, *more) if process is not None)


def test_tasks_that_failed_for_good_are_listed_with_the_reason(stack):
    failing = stack.client.submit("test.fail", "broken twice", queue=stack.queue, max_retries=1)
    permanent = stack.client.submit("test.permanent", "hopeless", queue=stack.queue, max_retries=3)
    succeeding = stack.client.submit("test.echo", "fine", queue=stack.queue)

    final = finish(stack.client, failing, permanent, succeeding)
    assert final[failing].state == "FAILED" and final[permanent].state == "FAILED", logs(stack)
    letters = dead_letters_of(stack.client, failing, permanent)

    assert letters[failing].state == "FAILED"
    assert letters[failing].attempts == 2
    assert letters[failing].type == "test.fail" and letters[failing].queue == stack.queue
    assert "gave up after 2 attempt(s)" in letters[failing].reason
    assert "RuntimeError: broken twice" in letters[failing].error
    assert letters[permanent].state == "FAILED"
    assert letters[permanent].attempts == 1
    assert "PermanentError" in letters[permanent].reason
    assert letters[permanent].dead_at is not None
    all_letters, total = stack.client.dead_letters()
    assert succeeding not in {letter.task_id for letter in all_letters}
    assert total >= 2

    listed = run_qm("dead", "list", server=stack.server.address)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[1]: line for line in listed.stdout.splitlines() if line.count(" ") > 2
             and line.split()[1] in (failing, permanent)}
    assert "gave up after 2 attempt(s)" in lines[failing] and "attempts=2" in lines[failing], listed.stdout
    assert "PermanentError" in lines[permanent] and "FAILED" in lines[permanent], listed.stdout
    assert f"{total} dead letter(s)" in listed.stdout

    as_json = run_qm("dead", "list", "--json", server=stack.server.address)
    assert as_json.returncode == 0, as_json.stderr
    by_id = {item["task_id"]: item for item in map(json.loads, as_json.stdout.splitlines())}
    assert by_id[failing]["attempts"] == 2 and by_id[permanent]["state"] == "FAILED"


def test_requeued_dead_letter_runs_again_as_a_new_task_and_leaves_the_list(stack, tmp_path):
    counter = tmp_path / "flaky-runs"
    task_id = stack.client.submit("test.flaky", f"{counter}:1", queue=stack.queue, max_retries=0)
    assert finish(stack.client, task_id)[task_id].state == "FAILED", logs(stack)
    dead_letters_of(stack.client, task_id)

    renamed = stack.client.requeue_dead_letters([task_id])

    assert list(renamed) == [task_id]
    new_id = renamed[task_id]
    assert new_id != task_id
    assert task_id not in {letter.task_id for letter in stack.client.dead_letters(limit=1000)[0]}
    assert stack.client.result(new_id, timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 2", logs(stack)
    again = stack.client.status(new_id)
    assert again.attempts == 1 and again.type == "test.flaky" and again.queue == stack.queue
    assert stack.client.status(task_id).state == "FAILED"  # the old task's record is history
    assert counter.read_text() == "xx"


def test_requeue_through_the_command_line(stack):
    task_id = stack.client.submit("test.permanent", "once more", queue=stack.queue)
    finish(stack.client, task_id)
    dead_letters_of(stack.client, task_id)

    requeued = run_qm("dead", "requeue", task_id, server=stack.server.address)

    assert requeued.returncode == 0, requeued.stderr
    assert "requeued 1 task(s)" in requeued.stdout
    new_id = requeued.stdout.split(f"{task_id} -> ")[1].split()[0]
    assert finish(stack.client, new_id)[new_id].state == "FAILED"  # still hopeless, but it ran again
    assert stack.client.status(new_id).error.startswith("PermanentError")


def test_requeue_all_through_the_command_line_runs_every_dead_letter_again(stack, tmp_path):
    """README: `qm dead requeue --all`. Every dead letter of the server runs again as a new
    task and leaves the list."""
    counters = [tmp_path / f"flaky-{n}" for n in range(2)]
    ids = [stack.client.submit("test.flaky", f"{counter}:1", queue=stack.queue, max_retries=0)
           for counter in counters]
    assert {status.state for status in finish(stack.client, *ids).values()} == {"FAILED"}, logs(stack)
    dead_letters_of(stack.client, *ids)
    _letters, total = stack.client.dead_letters()
    assert total == len(ids), "this test's server should hold only its own dead letters"

    requeued = run_qm("dead", "requeue", "--all", server=stack.server.address)

    assert requeued.returncode == 0, requeued.stderr
    assert f"requeued {len(ids)} task(s)" in requeued.stdout, requeued.stdout
    renamed = dict(line.split(" -> ") for line in requeued.stdout.splitlines() if " -> " in line)
    assert set(renamed) == set(ids), requeued.stdout
    for old_id, new_id in renamed.items():
        assert new_id != old_id
        assert stack.client.result(new_id, timeout_s=RESULT_TIMEOUT_S) == "succeeded on run 2", logs(stack)
    assert stack.client.dead_letters() == ([], 0)
    assert [counter.read_text() for counter in counters] == ["xx", "xx"]


def test_requeue_of_an_unknown_dead_letter_is_not_found(stack):
    with pytest.raises(RemoteError) as caught:
        stack.client.requeue_dead_letters(["no-such-task"])
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert "no-such-task" in str(caught.value)


def test_requeue_without_ids_is_refused(stack):
    with pytest.raises(RemoteError) as caught:
        stack.client.requeue_dead_letters([])
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT

    result = run_qm("dead", "requeue", server=stack.server.address)
    assert result.returncode == 2, result
    assert "--all" in result.stderr


def test_purge_empties_the_dead_letter_list(stack):
    ids = [stack.client.submit("test.permanent", str(n), queue=stack.queue) for n in range(2)]
    finish(stack.client, *ids)
    dead_letters_of(stack.client, *ids)

    purged = stack.client.purge_dead_letters()

    assert purged >= 2
    assert stack.client.dead_letters() == ([], 0)
    listed = run_qm("dead", "list", server=stack.server.address)
    assert listed.returncode == 0 and "0 dead letter(s)" in listed.stdout, listed
    cli_purge = run_qm("dead", "purge", server=stack.server.address)
    assert cli_purge.returncode == 0 and "purged 0 dead letter(s)" in cli_purge.stdout, cli_purge
    with pytest.raises(RemoteError) as caught:
        stack.client.requeue_dead_letters(ids[:1])
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def sacrifice_workers(launcher, rabbitmq, stack, task_id: str) -> list:
    """Start workers (one child each) one after another while the task kills them, until it
    is terminal; bounded by MAX_DOOMED_WORKERS. The dead workers, in order."""
    dead = []
    while not stack.client.status(task_id).terminal:
        assert len(dead) < MAX_DOOMED_WORKERS, \
            f"{len(dead)} workers killed and the task still not stopped\n{logs(stack, *dead)}"
        worker = launcher.worker(rabbitmq.url, procs=1, queues=stack.queue, env=stack.env, wait_ready=False)
        wait_until(lambda worker=worker: not worker.alive() or stack.client.status(task_id).terminal,
                   WORKER_DEATH_TIMEOUT_S,
                   message="the worker-killing task killing its worker (or ending)")
        if worker.alive():
            worker.stop()  # the task ended without this worker: it is not a victim
        else:
            dead.append(worker)
    return dead


def test_task_that_kills_its_worker_every_time_is_stopped_by_the_delivery_limit(rabbitmq, launcher, make_stack):
    stack = make_stack(env={"QM_BROKER__DELIVERY_LIMIT": "2"}, worker=False)
    poison = stack.client.submit("test.kill_worker", "", queue=stack.queue)
    bystander = stack.client.submit("test.echo", "still served", queue=stack.queue)

    dead = sacrifice_workers(launcher, rabbitmq, stack, poison)

    status = stack.client.status(poison)
    assert status.state == "CRASHED", logs(stack, *dead)
    assert "delivery_limit" in status.error and "started" in status.error
    # stopped after its 2 starts (each killed a worker), not before; one more death at most
    # if a worker died before its first RUNNING event reached RabbitMQ
    assert 2 <= len(dead) <= 3, \
        f"{len(dead)} workers killed with broker.delivery_limit=2\n{logs(stack, *dead)}"
    letter = dead_letters_of(stack.client, poison)[poison]
    assert letter.state == "CRASHED"
    assert "delivery_limit" in letter.reason
    survivor = launcher.worker(rabbitmq.url, procs=1, queues=stack.queue, env=stack.env)
    assert stack.client.result(bystander, timeout_s=RESULT_TIMEOUT_S) == "still served", logs(stack, survivor)
    # served by a worker the poison did not kill (the one that dead-lettered it, or the survivor)
    assert stack.client.status(bystander).worker not in {worker.worker_id for worker in dead}
    assert survivor.alive()
    assert stack.client.status(poison).state == "CRASHED"


def test_worker_killing_task_takes_down_no_more_workers_than_the_delivery_limit(rabbitmq, launcher, make_stack):
    stack = make_stack(env={"QM_BROKER__DELIVERY_LIMIT": "1"}, worker=False)
    poison = stack.client.submit("test.kill_worker", "", queue=stack.queue)

    dead = sacrifice_workers(launcher, rabbitmq, stack, poison)

    assert stack.client.status(poison).state == "CRASHED", logs(stack, *dead)
    # The first start of a task is reported without waiting for the broker's confirm, so a
    # worker killed at once may not have it on record: limit + 1 deaths at most.
    assert 1 <= len(dead) <= 2, f"{len(dead)} workers killed with broker.delivery_limit=1"
