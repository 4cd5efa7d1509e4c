"""`qm submit --in / --at` and `qm status` of a delayed task, as a user runs them."""
from __future__ import annotations

import datetime
import json

from tests.e2e.test_cli import explain, submit
from tests.processes import run_qm


def test_submit_in_shows_scheduled_with_its_due_time_and_cancel_ends_it(stack):
    submitted = submit(stack, "-T", "math", "-P", "6 * 7", "--in", "600")
    assert submitted.returncode == 0, explain(submitted)
    task_id = submitted.stdout.strip()

    shown = run_qm("status", task_id, server=stack.server.address)
    assert shown.returncode == 0, explain(shown)
    rows = dict(line.split(None, 1) for line in shown.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert rows["state"] == "SCHEDULED", shown.stdout
    due = datetime.datetime.fromisoformat(rows["due"])
    created = datetime.datetime.fromisoformat(rows["created"])
    assert 599 <= (due - created).total_seconds() <= 601, shown.stdout
    as_json = json.loads(run_qm("status", task_id, "--json", server=stack.server.address).stdout)
    assert as_json["state"] == "SCHEDULED" and as_json["next_attempt_at"], as_json

    assert run_qm("cancel", task_id, server=stack.server.address).returncode == 0
    assert json.loads(run_qm("status", task_id, "--json", server=stack.server.address).stdout)["state"] == "CANCELLED"


def test_submit_at_a_past_time_runs_now_and_bad_delays_exit_2_naming_the_problem(stack):
    ran = submit(stack, "-T", "math", "-P", "6 * 7", "--at", "2000-01-01T00:00:00Z", "--wait")
    assert (ran.returncode, ran.stdout) == (0, "42\n"), explain(ran)

    not_a_time = submit(stack, "-T", "math", "-P", "1", "--at", "tomorrow")
    assert not_a_time.returncode == 2 and "ISO-8601" in not_a_time.stderr, explain(not_a_time)
    too_far = submit(stack, "-T", "math", "-P", "1", "--in", str(30 * 86400))
    assert too_far.returncode == 2 and "server.max_delay_s" in too_far.stderr, explain(too_far)
    negative = submit(stack, "-T", "math", "-P", "1", "--in", "-5")
    assert negative.returncode == 2 and "delay_s" in negative.stderr, explain(negative)
    both = submit(stack, "-T", "math", "-P", "1", "--in", "5", "--at", "2030-01-01T00:00:00Z")
    assert both.returncode == 2 and "not allowed with" in both.stderr, explain(both)
