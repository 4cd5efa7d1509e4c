"""Group benchmark (issue 14, item 4): what a group costs to submit, and how soon its
callback follows the last member.

    .venv/bin/python load/bench_groups.py                     # 3 rounds of 1000 members
    .venv/bin/python load/bench_groups.py --members 200 --rounds 1

Starts a private RabbitMQ in a temporary directory, one qm-server and one
`qm-worker --procs 2` (tests/processes.py). Each round submits `--members` test.echo tasks
once with submit_many (SubmitTasks, 1000 per call) and once as a group with a
test.group_record callback (SubmitGroup: one call, one transaction), waits for every
member, then for the callback. Prints, per round: each submit's time, and the time from
the client seeing the last member finish to the callback's result. Exit 1 if the callback
did not see every result. Needs plugins/qm-testtasks (scripts/setup --test). Asserts
nothing about speed; the machine's load shows in it.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qm  # noqa: E402
from tests.processes import local_stack  # noqa: E402

#: Bound on a round's tasks finishing.
FINISH_BOUND_S = 300.0


def one_round(client: qm.Client, members: int) -> tuple[float, float, float, bool]:
    items = [("test.echo", str(n)) for n in range(members)]
    started = time.perf_counter()
    ids = client.submit_many(items)
    many_s = time.perf_counter() - started
    list(client.results(ids, timeout_s=FINISH_BOUND_S))
    started = time.perf_counter()
    group_id = client.submit_group(items, then=("test.group_record", None))
    group_s = time.perf_counter() - started
    list(client.results(client.group_status(group_id).task_ids, timeout_s=FINISH_BOUND_S))
    last_seen = time.perf_counter()
    summary = client.result(client.group_status(group_id).callback_task_id, timeout_s=FINISH_BOUND_S)
    callback_s = time.perf_counter() - last_seen
    return many_s, group_s, callback_s, summary["sum"] == sum(range(members)) and summary["count"] == members


def run(members: int, rounds: int) -> int:
    ok = True
    with local_stack("qm-bench-groups-", procs=2) as stack:
        server = stack.server
        with qm.Client(server.address, batch_items=1000) as client:
            client.submit_many([("test.echo", "warm-up")] * 50)
            for number in range(rounds):
                many_s, group_s, callback_s, right = one_round(client, members)
                ok &= right
                print(f"round {number}: {members} members: submit_many {many_s * 1000:.0f} ms, submit_group "
                      f"{group_s * 1000:.0f} ms; last member seen -> callback result {callback_s * 1000:.0f} ms"
                      f"{'' if right else '; CALLBACK MISSED RESULTS'}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000, help="members per group (at most 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    return run(args.members, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
