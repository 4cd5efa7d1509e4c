"""What `qm status/workers/types/dead list` print is unchanged now that qm.Client answers
dataclasses with TaskState states instead of strings and dicts: the same JSON objects,
key for key, and the same text lines."""
from __future__ import annotations

import argparse
import json

import pytest

from qm._proto.qm.v1 import task_queue_pb2
from qm.client import cli
from qm.client.common import (
    dead_letters_from_proto,
    schedule_from_proto,
    status_from_proto,
    task_types_from_proto,
    workers_from_proto,
)
from qm.states import TaskState

#: 2026-01-01T00:00:00Z and a second later, in seconds since the epoch.
T0_S = 1767225600


class AnsweringClient:
    """Answers each call from a fixed proto response, through the client's conversions."""

    def __init__(self, **responses) -> None:
        self.responses = responses

    def status(self, task_id):
        return status_from_proto(self.responses["status"])

    def workers(self):
        return workers_from_proto(self.responses["workers"])

    def task_types(self):
        return task_types_from_proto(self.responses["types"])

    def dead_letters(self, limit):
        return dead_letters_from_proto(self.responses["dead"])

    def list_schedules(self):
        return [schedule_from_proto(proto) for proto in self.responses["schedules"]]


def printed(capsys, command, client, **args) -> list[str]:
    assert command(client, argparse.Namespace(**args)) == 0
    return capsys.readouterr().out.splitlines()


def test_status_json_keeps_its_shape_with_the_state_by_name(capsys):
    proto = task_queue_pb2.TaskStatus(task_id="t1", type="math", queue="default", state=4, attempts=1,  # type: ignore[arg-type]
                                      result=b"11", codec="text", worker="w1", timeout_s=60.0, max_retries=3,
                                      priority=7)
    proto.created_at.FromSeconds(T0_S)
    proto.updated_at.FromSeconds(T0_S + 1)
    status = status_from_proto(proto)
    assert status.state is TaskState.SUCCEEDED and status.state == "SUCCEEDED" and status.terminal

    [line] = printed(capsys, cli.cmd_status, AnsweringClient(status=proto), task_id="t1", json=True)
    assert list(json.loads(line).items()) == [
        ("id", "t1"), ("type", "math"), ("queue", "default"), ("state", "SUCCEEDED"), ("attempts", 1),
        ("result", "11"), ("error", ""), ("worker", "w1"), ("created_at", "2026-01-01T00:00:00.000+00:00"),
        ("started_at", None), ("finished_at", None), ("updated_at", "2026-01-01T00:00:01.000+00:00"),
        ("timeout_s", 60.0), ("memory_limit_mb", 0), ("max_retries", 3), ("next_attempt_at", None),
        ("progress", 0.0), ("progress_message", ""), ("progress_detail", None), ("progress_at", None),
        ("priority", 7), ("cpus", 1),
        ("schedule_id", ""),
        ("group_id", "")]
    text = printed(capsys, cli.cmd_status, AnsweringClient(status=proto), task_id="t1", json=False)
    assert "state     SUCCEEDED" in text and "priority  7" in text


def test_workers_print_the_same_json_objects_and_lines(capsys):
    response = task_queue_pb2.ListWorkersResponse()
    worker = response.workers.add(worker_id="w1", host="h", pid=7, procs=2, busy=1, queues=["default"],
                                  types=["math"], version="0.2.0", state="active")
    worker.last_seen.FromSeconds(T0_S)
    client = AnsweringClient(workers=response)

    [line] = printed(capsys, cli.cmd_workers, client, json=True)
    assert list(json.loads(line).items()) == [
        ("worker_id", "w1"), ("host", "h"), ("pid", 7), ("procs", 2), ("busy", 1), ("queues", ["default"]),
        ("types", ["math"]), ("version", "0.2.0"), ("state", "active"),
        ("last_seen", "2026-01-01T00:00:00.000+00:00"), ("busy_cpus", 0)]
    assert printed(capsys, cli.cmd_workers, client, json=False) == [
        "w1                           active   h pid 7 busy 1/2 cpus 0/2 queues default v0.2.0 last seen "
        "2026-01-01T00:00:00.000+00:00 types math", "1 active worker(s)"]


def test_task_types_print_the_same_json_objects_and_lines(capsys):
    response = task_queue_pb2.ListTaskTypesResponse()
    response.types.add(name="math", codec="text", description="Safe arithmetic", default_timeout_s=60.0,
                       max_timeout_s=600.0, default_memory_limit_mb=0, max_memory_limit_mb=0, default_max_retries=3,
                       default_priority=5)
    client = AnsweringClient(types=response)

    [line] = printed(capsys, cli.cmd_types, client, json=True)
    assert list(json.loads(line).items()) == [
        ("name", "math"), ("codec", "text"), ("description", "Safe arithmetic"), ("default_timeout_s", 60.0),
        ("max_timeout_s", 600.0), ("default_memory_limit_mb", 0), ("max_memory_limit_mb", 0),
        ("default_max_retries", 3), ("default_priority", 5), ("cpus", 1)]
    assert printed(capsys, cli.cmd_types, client, json=False) == [
        "math                 text  timeout 60 s (max 600 s), memory unlimited, retries 3, priority 5  Safe arithmetic"]


def test_dead_letters_print_the_state_by_name(capsys):
    response = task_queue_pb2.ListDeadLettersResponse(total=1)
    letter = response.dead_letters.add(task_id="t9", type="math", queue="default", state=8, attempts=4,  # type: ignore[arg-type]
                                       reason="delivery_limit", error="killed")
    letter.dead_at.FromSeconds(T0_S)

    [line] = printed(capsys, cli.cmd_dead, AnsweringClient(dead=response), dead_command="list", limit=10,
                     json=True)
    assert json.loads(line) == {"task_id": "t9", "type": "math", "queue": "default", "state": "CRASHED",
                                "attempts": 4, "reason": "delivery_limit", "error": "killed",
                                "dead_at": "2026-01-01T00:00:00.000+00:00"}


def test_schedule_list_shows_when_the_task_the_next_tick_and_what_it_did(capsys):
    nightly = task_queue_pb2.Schedule(
        schedule_id="nightly", cron="0 3 * * *", timezone="Europe/Paris",
        missed_ticks=task_queue_pb2.SCHEDULE_MISSED_TICKS_SKIP,
        task=task_queue_pb2.SubmitTaskRequest(type="math", payload=b"6 * 7"), last_task_id="t9", fires=4, missed=1,
        last_error="type: unknown task type 'math'")
    nightly.next_fire_at.FromSeconds(T0_S)
    every = task_queue_pb2.Schedule(schedule_id="each-30s", every_s=30, timezone="UTC",
                                    missed_ticks=task_queue_pb2.SCHEDULE_MISSED_TICKS_COALESCE,
                                    task=task_queue_pb2.SubmitTaskRequest(type="math", payload=b"1"))
    client = AnsweringClient(schedules=[every, nightly])
    lines = printed(capsys, cli.cmd_schedule, client, schedule_command="list", json=False)
    assert lines[0].startswith("each-30s ") and "every 30s" in lines[0] and "fires 0 missed 0 (coalesce)" in lines[0]
    assert "0 3 * * * (Europe/Paris)" in lines[1] and "next 2026-01-01T00:00:00.000+00:00" in lines[1]
    assert "fires 4 missed 1 (skip) last t9 error: type: unknown task type 'math'" in lines[1]
    assert lines[2] == "2 schedule(s)"
    [first, _] = printed(capsys, cli.cmd_schedule, client, schedule_command="list", json=True)
    assert json.loads(first) == {
        "id": "each-30s", "cron": "", "every_s": 30.0, "timezone": "UTC", "missed": "coalesce", "type": "math",
        "payload": "1", "queue": "", "created_at": None, "next_fire_at": None, "last_fired_at": None,
        "last_task_id": "", "fires": 0, "missed_ticks": 0, "last_error": ""}


def test_submit_group_sends_priority_and_cpus_on_every_member(tmp_path, capsys):
    from qm.client import cli_groups
    from qm.client.common import group_request

    sent = []

    class GroupClient:
        submit_retry_s = 0.0

        def submit_group(self, items, then=None, *, idempotency_key=None, **options):
            sent.append(group_request(items, then, options, idempotency_key))
            return "g-1"

    members = tmp_path / "members.txt"
    members.write_text("1 + 1\n2 + 2\n")
    args = cli.build_parser().parse_args(
        ["submit-group", "-T", "math", "--from-file", str(members), "--priority", "8", "--cpus", "2"])
    assert cli_groups.cmd_submit_group(GroupClient(), args) == 0
    [request] = sent
    assert [(item.priority, item.cpus) for item in request.items] == [(8, 2), (8, 2)]
    assert capsys.readouterr().out.strip() == "g-1"


def test_submit_group_refuses_a_priority_over_9_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["submit-group", "-T", "math", "--from-file", "-", "--priority", "10"])
    assert exit_info.value.code == 2
    assert "--priority" in capsys.readouterr().err
