"""What `qm status/workers/types/dead list` print is unchanged now that qm.Client answers
dataclasses with TaskState states instead of strings and dicts: the same JSON objects,
key for key, and the same text lines."""
from __future__ import annotations

import argparse
import json

from qm._proto.qm.v1 import task_queue_pb2
from qm.client import cli
from qm.client.common import (dead_letters_from_proto, status_from_proto, task_types_from_proto,
                              workers_from_proto)
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
        ("priority", 7), ("cpus", 1)]
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
