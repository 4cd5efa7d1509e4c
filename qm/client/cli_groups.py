"""`qm submit-group` and the group view of `qm status` (qm/client/cli.py dispatches here)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from qm.client.client import Client, GroupStatus
from qm.errors import WaitTimeout
from qm.priority import option_value
from qm.states import TaskState

EXIT_TASK_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT = 1, 2, 124

DESCRIPTION = """Submit a group of tasks (one per line of --from-file) and, with --then, a
callback task that runs once, after every member finished (failed or cancelled members
count). The callback's payload is a JSON document: {"group_id", "payload" (--then-payload),
"task_ids", "results" (in line order, null where a member did not succeed), "failures"
([{"index", "task_id", "state", "error"}]), "succeeded", "failed", "results_omitted"}.
The group is accepted as a whole or not at all; the group id is printed once every member
is durable. `qm status GROUP_ID` shows the members per state and the callback."""

EPILOG = """examples:
  qm submit-group -T math --from-file exprs.txt --then examples.sum_results
  qm submit-group -T math --from-file - --then examples.sum_results --wait
  qm status GROUP_ID"""


def add_parser(commands) -> None:
    group = commands.add_parser(
        "submit-group",
        help="submit a group of tasks with a callback that runs once they all finished; prints the group id",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group.add_argument("-T", "--type", required=True, help="task type of the members, e.g. math")
    group.add_argument(
        "--from-file",
        metavar="FILE",
        required=True,
        help="one member per line of FILE (- reads stdin), blank lines skipped; at most "
        "server.max_batch_items (default 1000) members",
    )
    group.add_argument("--then", metavar="TYPE", help="task type of the callback (default: no callback)")
    group.add_argument(
        "--then-payload",
        metavar="TEXT",
        help="the callback's own payload, given to it as the document's \"payload\" "
        "(parsed as JSON if its type's codec is json; default: null)",
    )
    group.add_argument("--queue", default="", help="logical queue of the members and the callback (default: default)")
    group.add_argument("--timeout", metavar="S", type=float, default=0.0, help="hard time limit of each member")
    group.add_argument("--max-retries", metavar="N", type=int, help="retries of each member (default: the type's)")
    group.add_argument(
        "--priority",
        metavar="N",
        type=option_value,
        help="0 (lowest) to 9 (highest) of each member (default: the type's, else 5)",
    )
    group.add_argument(
        "--cpus",
        metavar="N",
        type=int,
        default=0,
        help="CPU slots each member takes on a worker (default: the type's, else 1)",
    )
    group.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="the group's key: the same command again returns the first group instead of a "
        "second (default: a fresh key, reused by this command's own retries)",
    )
    group.add_argument(
        "--retry-for",
        metavar="S",
        type=float,
        default=30.0,
        help="keep retrying while the server or its broker is unavailable, up to S seconds (default 30)",
    )
    group.add_argument(
        "--wait",
        action="store_true",
        help="wait for the group: print the callback's result (without --then: each member's, "
        "in order); exit 0 only if it SUCCEEDED (every member did)",
    )
    group.add_argument("--wait-timeout", metavar="S", type=float, help="with --wait: stop waiting after S seconds")
    group.add_argument("--json", action="store_true", help="print JSON")


def cmd_submit_group(client: Client, args) -> int:
    client.submit_retry_s = args.retry_for
    try:
        source = contextlib.nullcontext(sys.stdin) if args.from_file == "-" else open(args.from_file, encoding="utf-8")
    except OSError as exc:
        print(f"qm: cannot read {args.from_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with source as lines:
        payloads = [line.rstrip("\r\n") for line in lines if line.strip()]
    if not payloads:
        print(f"qm: {args.from_file}: no members (every line is blank)", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = dict(
        queue=args.queue, timeout_s=args.timeout, max_retries=args.max_retries, priority=args.priority, cpus=args.cpus
    )
    then = (args.then, args.then_payload, {"queue": args.queue}) if args.then else None
    group_id = client.submit_group(
        [(args.type, payload) for payload in payloads], then, idempotency_key=args.idempotency_key, **options
    )
    if not args.wait:
        print(json.dumps({"group_id": group_id}) if args.json else group_id)
        return 0
    return _wait(client, args, group_id)


def _wait(client: Client, args, group_id: str) -> int:
    """Members first (over one stream); the callback exists once the last one finished."""
    group = client.group_status(group_id)
    try:
        finals = {status.task_id: status for status in client.results(group.task_ids, args.wait_timeout)}
        if group.callback_task_id:
            final = next(client.results([group.callback_task_id], args.wait_timeout))
            if args.json:
                print(json.dumps({"group_id": group_id, "callback": final.to_dict()}))
            elif final.state is TaskState.SUCCEEDED:
                print(final.result if isinstance(final.result, str) else json.dumps(final.result))
            if final.state is not TaskState.SUCCEEDED:
                print(f"qm: callback {final.task_id} ended {final.state}: {final.error}", file=sys.stderr)
            return 0 if final.state is TaskState.SUCCEEDED else EXIT_TASK_FAILED
    except WaitTimeout as exc:
        print(group_id)
        print(f"qm: {exc}; the group goes on: qm status {group_id}", file=sys.stderr)
        return EXIT_TIMEOUT
    failed = False
    for task_id in group.task_ids:
        status = finals[task_id]
        if args.json:
            print(json.dumps(status.to_dict()))
        elif status.state is TaskState.SUCCEEDED:
            print(status.result if isinstance(status.result, str) else json.dumps(status.result))
        if status.state is not TaskState.SUCCEEDED:
            failed = True
            print(f"qm: task {task_id} ended {status.state}: {status.error}", file=sys.stderr)
    return EXIT_TASK_FAILED if failed else 0


def show_group(status: GroupStatus, when) -> str:
    """`qm status GROUP_ID`: counts per state and the callback."""
    counts = ", ".join(f"{state} {count}" for state, count in sorted(status.counts.items())) or "-"
    if not status.callback_task_id:
        callback = "none"
    else:
        callback = f"{status.callback_task_id} {status.callback_state or 'WAITING (for the members)'}"
    rows = [
        ("group", status.group_id),
        ("members", f"{status.members} ({status.finished} finished)"),
        ("states", counts),
        ("callback", callback),
        ("created", when(status.created_at)),
        ("completed", when(status.completed_at)),
    ]
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def group_json(status: GroupStatus, when) -> str:
    data = status.to_dict()
    for key in ("created_at", "completed_at"):
        data[key] = when(data[key]) if data[key] is not None else None
    return json.dumps(data)
