"""`qm`: submit tasks and follow them from the command line.

Exit codes: 0 success; 1 a task did not succeed (--wait, watch) or a server-side error;
2 bad input (usage, unknown type, invalid payload, bad config); 3 server or broker
unreachable; 4 refused: no or a bad token (UNAUTHENTICATED) or a role without the right
(PERMISSION_DENIED); 124 --wait-timeout expired; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import sys
from typing import Iterator, Sequence

import grpc

from qm.client import cli_groups
from qm.client.client import Client, RemoteError, Schedule, TaskStatus
from qm.config import load_config
from qm.errors import BatchError, ConfigError, TaskError, ValidationError, WaitTimeout
from qm.priority import option_value
from qm.reasons import Reason
from qm.states import TaskState
from qm.task_progress import Progress

EXIT_TASK_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_DENIED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
#: gRPC codes of a call refused for who made it (exit EXIT_DENIED).
DENIED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
#: --wait-timeout expired (what timeout(1) returns).
EXIT_TIMEOUT = 124

EPILOG = """examples:
  qm submit -T math -P "1 + 2 * 5" --wait      prints 11
  qm submit -T math --from-file exprs.txt      one task per line; prints the ids in order
  qm submit -T math --from-file - --wait       from stdin; prints the results in order
  qm status TASK_ID --json
  qm submit-group -T math --from-file exprs.txt --then examples.sum_results
                                                 a group and a callback run once all finished
  qm status GROUP_ID                             a group's members per state and its callback
  qm watch TASK_ID [TASK_ID ...]               a progress bar on a terminal, lines otherwise
  qm cancel TASK_ID
  qm types                                       task types the server accepts
  qm run -T math -P "2 ** 10"                    run one task here, no server (plugin authors)
  qm dead list | qm dead requeue TASK_ID... | --all | qm dead purge
  qm schedule add --cron "*/5 * * * *" -T math -P "2 ** 10"   a task every 5 minutes
  qm schedule list | qm schedule remove SCHEDULE_ID
  qm token create --role submit --tokens-file tokens.json --name ci
                                                 prints a new token once; stores its hash
  qm --server host:50051 --tls-ca ca.pem --token qm_... status TASK_ID

The server address comes from --server, else QM_CLIENT__SERVER, else client.server in the
config file (--config or QM_CONFIG), else 127.0.0.1:50051. Several, comma-separated
(a:50051,b:50051): each call fails over to the next when one cannot be reached, and a
wait (--wait, watch) rides out a server restart.
TLS and token: --tls-ca/--token, else QM_CLIENT__TLS_CA/QM_CLIENT__TOKEN, else client.tls_ca
and client.token in the config file (docs/security.md).
exit codes: 0 ok, 1 task did not succeed / server error, 2 bad input, 3 unreachable,
4 not authenticated / not allowed, 124 --wait-timeout expired, 130 interrupted"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qm",
        description="QueueMaster command-line client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT[,...]",
        help="qm-server address, or several comma-separated to fail over between (client.server)",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: $QM_CONFIG, else none)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="PEM CA of the server's certificate: connect with TLS (client.tls_ca)"
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="this client's PEM certificate, for mTLS (client.tls_cert)")
    parser.add_argument("--tls-key", metavar="FILE", help="the PEM key of --tls-cert (client.tls_key)")
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="bearer token from `qm token create` (client.token; prefer QM_CLIENT__TOKEN: a "
        "flag shows in the process list)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="submit a task; prints its id (or its result with --wait)",
        description="Submit a task. The server validates the type and payload "
        "before accepting; the id is printed once the task is durable.",
    )
    submit.add_argument("-T", "--type", required=True, help="task type, e.g. math")
    payload = submit.add_mutually_exclusive_group(required=True)
    payload.add_argument("-P", "--payload", help="payload text for the task type (e.g. an expression); - reads stdin")
    payload.add_argument(
        "--from-file",
        metavar="FILE",
        help="one task per line of FILE (- reads stdin), blank lines skipped, sent in "
        "batches (SubmitTasks); prints one id per line in order; a refused line is "
        "named by its number on stderr and the others are still submitted",
    )
    _add_task_options(submit)
    when = submit.add_mutually_exclusive_group()
    when.add_argument(
        "--in",
        dest="delay",
        metavar="S",
        type=float,
        help="run no earlier than S seconds from now (SCHEDULED until then; at most "
        "server.max_delay_s, default 7 days)",
    )
    when.add_argument(
        "--at",
        dest="not_before",
        metavar="ISO-8601",
        type=_epoch_s,
        help="run no earlier than this time, e.g. 2026-12-24T18:00:00Z (no offset: local "
        "time); a time already past runs now",
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a repeated submit with the same key (and the same request) returns the first "
        "task instead of a new one; with --from-file, line N gets KEY/N (default: a "
        "fresh key, reused by this command's own retries)",
    )
    submit.add_argument(
        "--retry-for",
        metavar="S",
        type=float,
        default=30.0,
        help="keep retrying while the server or its broker is unavailable, up to S seconds "
        "(default 30; 0 = fail at once)",
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait for the task(s) and print the result(s), in order; exit 0 only if all "
        "SUCCEEDED. Rides out a restart of the server",
    )
    submit.add_argument(
        "--wait-timeout",
        metavar="S",
        type=float,
        help="with --wait: stop waiting after S seconds, print the id(s) still running and "
        "exit 124 (the tasks go on; follow them with qm watch)",
    )
    submit.add_argument("--json", action="store_true", help="print JSON (the task id, or its full status with --wait)")

    cli_groups.add_parser(commands)

    status = commands.add_parser(
        "status",
        help="show a task's state, attempts, result, error, times, worker, progress; or a group's counts",
        description="Show one task's current status, or a group's members per state and its callback.",
    )
    status.add_argument("task_id", metavar="ID", help="task id printed by qm submit, or group id by qm submit-group")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    watch = commands.add_parser(
        "watch",
        help="print each state change and progress report live until all tasks are terminal",
        description="Follow tasks live: the current state of each first, then "
        "every change and progress report (qm.progress in the task): "
        "a progress bar on a terminal, 'RUNNING 40% message' lines "
        "otherwise. Exits when all are terminal: 0 if all "
        "SUCCEEDED, else 1.",
    )
    watch.add_argument("task_ids", metavar="ID", nargs="+", help="task ids to follow")
    watch.add_argument(
        "--wait-timeout",
        metavar="S",
        type=float,
        help="stop after S seconds; the ids still running are named on stderr; exit 124",
    )
    watch.add_argument("--json", action="store_true", help="print one JSON object per change")

    workers = commands.add_parser(
        "workers",
        help="list workers: host, pid, busy children and busy CPU slots of procs, queues, types, last seen",
        description="Workers the server has heard from through their heartbeats; one "
        "silent longer than server.worker_lost_after_s is shown as lost.",
    )
    workers.add_argument("--json", action="store_true", help="print one JSON object per worker")

    types = commands.add_parser(
        "types",
        help="list the task types the server accepts",
        description="The task types the server accepts, with codec, default and "
        "maximum limits, and description; plugins that failed to load "
        "on the server are named too.",
    )
    types.add_argument("--json", action="store_true", help="print one JSON object per task type")

    run = commands.add_parser(
        "run",
        help="run one task here, without server or broker (for plugin authors)",
        description="Run one task locally through the same child-process path a "
        "worker uses, with its time and memory limits enforced; prints "
        "the result (progress reports go to stderr). Exit 0 if it "
        "SUCCEEDED, 1 otherwise, 2 on bad input.",
    )
    run.add_argument("-T", "--type", required=True, help="task type")
    run.add_argument("-P", "--payload", required=True, help="payload; - reads stdin")
    run.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=0.0,
        help="hard time limit, seconds (default: the type's, else 600)",
    )
    run.add_argument(
        "--soft-timeout",
        metavar="S",
        type=float,
        default=0.0,
        help="when the task gets qm.SoftTimeout, seconds, below the time limit (default: the type's, else none)",
    )
    run.add_argument(
        "--memory-limit", metavar="MB", type=int, default=0, help="memory limit, MiB (default: the type's, else none)"
    )

    cancel = commands.add_parser(
        "cancel",
        help="cancel a task: a queued one never runs, a running one is killed",
        description="Cancel a task. Its state becomes CANCELLED; a task that already "
        "ended cannot be cancelled (exit 1).",
    )
    cancel.add_argument("task_id", metavar="ID", help="task id")

    dead = commands.add_parser(
        "dead",
        help="inspect and replay dead letters (tasks that failed for good)",
        description="Tasks whose last attempt failed, crashed, timed out or ran out "
        "of memory with no retry left, or that RabbitMQ dead-lettered after "
        "its delivery limit.",
    )
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = dead_commands.add_parser("list", help="list dead letters, oldest first")
    dead_list.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    dead_list.add_argument("--json", action="store_true", help="print one JSON object per dead letter")
    requeue = dead_commands.add_parser("requeue", help="run dead letters again, each as a new task")
    requeue.add_argument("task_ids", metavar="ID", nargs="*", help="dead task ids to requeue")
    requeue.add_argument("--all", action="store_true", help="requeue every dead letter")
    dead_commands.add_parser("purge", help="forget every dead letter")
    _add_schedule_commands(commands)
    _add_token_commands(commands)
    return parser


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    """The task options submit and schedule add share: queue, limits, retries."""
    parser.add_argument("--queue", default="", help="logical queue (default: default)")
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=0.0,
        help="hard time limit in seconds; the task is killed at it (TIMED_OUT). "
        "Default: the task type's, else the server's (server.default_task_timeout_s)",
    )
    parser.add_argument(
        "--soft-timeout",
        metavar="S",
        type=float,
        default=0.0,
        help="soft time limit in seconds: the task gets qm.SoftTimeout then, to clean up; "
        "below the time limit. Default: the task type's, else none",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="MB",
        type=int,
        default=0,
        help="memory limit in MiB (RSS with subprocesses); the task is killed over it "
        "(MEMORY_EXCEEDED). Default: the task type's, else the server's, else none",
    )
    parser.add_argument(
        "--max-retries",
        metavar="N",
        type=int,
        help="retries after the first attempt for FAILED/CRASHED (default: the type's, else the "
        "server's, server.default_max_retries)",
    )
    parser.add_argument(
        "--retry-backoff",
        metavar="S",
        type=float,
        help="delay before the first retry, doubling each time (rounded down to a delay tier)",
    )
    parser.add_argument("--retry-backoff-max", metavar="S", type=float, help="cap of the retry delay")
    parser.add_argument(
        "--retry-on-timeout",
        action="store_true",
        default=None,
        help="retry TIMED_OUT attempts too (MEMORY_EXCEEDED never retries)",
    )
    parser.add_argument(
        "--no-retry-jitter",
        dest="retry_jitter",
        action="store_false",
        default=None,
        help="exact retry delays (default: each scaled by a random factor in [0.5, 1])",
    )
    parser.add_argument(
        "--priority",
        metavar="N",
        type=option_value,
        help="0 (lowest) to 9 (highest): among the tasks of the queue waiting for a worker, "
        "higher ones start first (default: the task type's, else 5; multi-CPU tasks wait "
        "in their size's queue, which has no priority order)",
    )
    parser.add_argument(
        "--cpus",
        metavar="N",
        type=int,
        default=0,
        help="CPU slots the task takes on a worker: a worker with --procs P runs at most P "
        "slots' worth at once; the task may use N threads or processes (qm.task_cpus()). "
        "Refused if no live worker of the queue has --procs >= N. Default: the type's, else 1",
    )


def _epoch_s(text: str) -> float:
    """An ISO-8601 time (`--at`) as seconds since the epoch; without an offset, local time."""
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time, e.g. 2026-12-24T18:00:00Z") from None


def _add_schedule_commands(commands) -> None:
    schedule = commands.add_parser(
        "schedule",
        help="periodic schedules: submit a task at every tick of a cron expression or interval",
        description="Periodic schedules, kept in the server's store: at each tick the server "
        "submits the schedule's task as qm submit would (validated, durable, "
        "with its schedule id), once per tick however many servers share the store. "
        "Ticks missed while every server was down: --missed coalesce (default) "
        "fires one task for the latest; skip fires nothing for a tick more than "
        "server.schedule_grace_s (30 s) late.",
        epilog="""examples:
  qm schedule add --cron "*/5 * * * *" -T math -P "2 ** 10"      every 5 minutes (UTC)
  qm schedule add --cron "0 3 * * *" --tz Europe/Paris -T math -P "1+1"   03:00 Paris time
  qm schedule add --cron "*/10 * * * * *" -T math -P "1+1"       6 fields: seconds first (every 10 s)
  qm schedule add --every 30 -T math -P "1+1" --id half-minute   every 30 s, on :00 and :30
  qm schedule list
  qm schedule remove half-minute""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a schedule; prints its id")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron",
        metavar="EXPR",
        help='cron expression: 5 fields "minute hour day-of-month month day-of-week", or 6 with '
        'seconds first ("*/10 * * * * *"), or @hourly, @daily, @weekly, @monthly, @yearly',
    )
    when.add_argument(
        "--every",
        metavar="S",
        type=float,
        help="a tick every S seconds (at least 1), on whole multiples of S since 1970-01-01 UTC",
    )
    add.add_argument("--tz", default="UTC", metavar="ZONE", help="IANA time zone of --cron (default UTC)")
    add.add_argument(
        "--missed",
        choices=("coalesce", "skip"),
        default="coalesce",
        help="ticks no server fired in time (all down): coalesce = one task for the latest "
        "(default); skip = none if more than server.schedule_grace_s late",
    )
    add.add_argument(
        "--id",
        dest="schedule_id",
        metavar="ID",
        help="the schedule's id, 1-100 of letters, digits, _ . : - (default: sch-<random>); "
        "adding the same id and definition again changes nothing",
    )
    add.add_argument("-T", "--type", required=True, help="task type of each tick's task, e.g. math")
    add.add_argument("-P", "--payload", required=True, help="payload of each tick's task; - reads stdin")
    _add_task_options(add)
    add.add_argument("--json", action="store_true", help="print the stored schedule as JSON")
    listing = actions.add_parser("list", help="list schedules: id, when, task, next tick, fires")
    listing.add_argument("--json", action="store_true", help="print one JSON object per schedule")
    remove = actions.add_parser("remove", help="remove a schedule (no tick fires after it)")
    remove.add_argument("schedule_id", metavar="ID", help="the schedule's id (qm schedule list)")


def _add_token_commands(commands) -> None:
    token = commands.add_parser(
        "token",
        help="create, list or revoke the server's bearer tokens (a local file)",
        description="Manage a tokens file (server.tokens_file) on the server's host: "
        "only SHA-256 hashes are stored; a new token is printed once. The "
        "server rereads the file when it changes. Roles: read (status, "
        "watch, types, workers, schedule list), submit (+ submit, cancel, schedule "
        "add/remove), admin (+ dead).",
    )
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="add a token and print it (the only time it is shown)")
    create.add_argument("--role", required=True, choices=("read", "submit", "admin"), help="what the token may do")
    create.add_argument("--name", help="a unique name, shown in logs and to revoke it (default: ROLE-RANDOM)")
    create.add_argument("--ttl", metavar="S", type=float, help="expires after S seconds (default: never)")
    listing = token_commands.add_parser("list", help="list tokens: name, role, created, expires, revoked")
    listing.add_argument("--json", action="store_true", help="print one JSON object per token")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name (effective at the next call)")
    revoke.add_argument("name", metavar="NAME", help="the token's name")
    for sub in (create, listing, revoke):
        sub.add_argument(
            "--tokens-file",
            metavar="FILE",
            help="the server's tokens file (server.tokens_file, QM_SERVER__TOKENS_FILE)",
        )


def cmd_token(args) -> int:
    import secrets as random_names

    from qm.security.tokens import TokenFile

    path = args.tokens_file or load_config(args.config).server.tokens_file
    if not path:
        print("qm: token: name the file with --tokens-file (or server.tokens_file)", file=sys.stderr)
        return EXIT_BAD_INPUT
    tokens = TokenFile(path, "--tokens-file")
    try:
        if args.token_command == "create":
            name = args.name or f"{args.role}-{random_names.token_hex(3)}"
            print(tokens.create(args.role, name, args.ttl))
            print(f"qm: token {name!r} ({args.role}) added to {path}; it is not shown again", file=sys.stderr)
        elif args.token_command == "revoke":
            entry = tokens.revoke(args.name)
            print(f"revoked {entry.name} ({entry.role})")
        else:
            for entry in tokens.read():
                data = {key: value for key, value in entry.to_json().items() if key != "sha256"}
                print(
                    json.dumps(data)
                    if args.json
                    else f"{entry.name:<24} {entry.role:<6} created {data['created_at']} expires "
                    f"{data['expires_at'] or 'never'} revoked {data['revoked_at'] or 'no'}"
                )
    except ValueError as exc:
        print(f"qm: token: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _as_json(status: TaskStatus, extra: dict | None = None) -> str:
    data = {**(extra or {}), **status.to_dict()}
    for key in ("created_at", "started_at", "finished_at", "updated_at", "progress_at"):
        data[key] = _when(data[key]) if data[key] is not None else None
    return json.dumps(data)


def _show(status: TaskStatus) -> str:
    memory = f"{status.memory_limit_mb} MiB" if status.memory_limit_mb else "unlimited"
    rows = [
        ("id", status.task_id),
        ("type", status.type),
        ("queue", status.queue),
        ("priority", status.priority),
        ("state", status.state),
        ("attempts", status.attempts),
        ("result", "" if status.result is None else status.result),
        ("error", status.error),
        ("worker", status.worker or "-"),
        (
            "limits",
            f"timeout {status.timeout_s:g} s, memory {memory}, retries {status.max_retries}, cpus {status.cpus}",
        ),
        (
            "due" if status.state in (TaskState.SCHEDULED, TaskState.QUEUED) else "next try",
            _when(status.next_attempt_at),
        ),
        ("progress", _progress_text(status) or "-"),
        ("schedule", status.schedule_id or "-"),
        ("created", _when(status.created_at)),
        ("started", _when(status.started_at)),
        ("finished", _when(status.finished_at)),
    ]
    if status.group_id:
        rows.append(("group", status.group_id))
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


#: Width of `qm watch`'s progress bar, in characters.
PROGRESS_BAR_CHARS = 30
#: Erase the terminal's current line and return to its start.
CLEAR_LINE = "\r\x1b[K"


def _progress_text(status: TaskStatus) -> str:
    """ "42% message", or "" if the task has not reported progress."""
    if status.progress_at is None:
        return ""
    return f"{status.progress * 100:.0f}% {status.progress_message}".rstrip()


def _progress_bar(status: TaskStatus) -> str:
    filled = round(status.progress * PROGRESS_BAR_CHARS)
    bar = "#" * filled + "." * (PROGRESS_BAR_CHARS - filled)
    return f"{status.task_id} [{bar}] {status.progress * 100:3.0f}% {status.progress_message}".rstrip()


def _change_line(status: TaskStatus) -> str:
    detail = ""
    if status.state is TaskState.RUNNING:
        detail = _progress_text(status)
    elif status.state is TaskState.SUCCEEDED:
        detail = status.result
    elif status.error and (status.terminal or status.state is TaskState.RETRYING):
        detail = status.error.splitlines()[0]
        if status.state is TaskState.RETRYING and status.next_attempt_at:
            detail += f" (next attempt at {_when(status.next_attempt_at)})"
    elif status.state is TaskState.SCHEDULED:
        detail = f"(due at {_when(status.next_attempt_at)})"
    # A progress report's line carries the report's time; a state change's, the change's.
    when = status.progress_at if status.state is TaskState.RUNNING and status.progress_at else status.updated_at
    return f"{_when(when)} {status.task_id} {status.state} {detail}".rstrip()


def cmd_submit(client: Client, args) -> int:
    client.submit_retry_s = args.retry_for
    options = dict(
        queue=args.queue,
        timeout_s=args.timeout,
        memory_limit_mb=args.memory_limit,
        max_retries=args.max_retries,
        retry_backoff_s=args.retry_backoff,
        retry_backoff_max_s=args.retry_backoff_max,
        retry_jitter=args.retry_jitter,
        retry_on_timeout=args.retry_on_timeout,
        soft_timeout_s=args.soft_timeout,
        delay_s=args.delay,
        not_before=args.not_before,
        cpus=args.cpus,
        priority=args.priority,
    )
    if args.from_file is not None:
        return _submit_lines(client, args, options)
    payload = sys.stdin.read() if args.payload == "-" else args.payload
    task_id = client.submit(args.type, payload, idempotency_key=args.idempotency_key, **options)
    if not args.wait:
        print(json.dumps({"id": task_id}) if args.json else task_id)
        return 0
    try:
        final = next(client.results([task_id], args.wait_timeout))
    except WaitTimeout as exc:
        print(task_id)
        print(f"qm: {exc}; it goes on: follow it with qm watch {task_id}", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_TASK_FAILED if _print_final(final, args) else 0


def _print_final(final: TaskStatus, args, line: int | None = None) -> bool:
    """Print a finished task as --wait does (its result, or its error on stderr); True if it
    did not succeed."""
    where = f"line {line}: " if line is not None else ""
    if args.json:
        print(_as_json(final, {"line": line} if line is not None else {}))
    elif final.state is TaskState.SUCCEEDED:
        print(final.result if isinstance(final.result, str) else json.dumps(final.result))
    if final.state is not TaskState.SUCCEEDED:
        print(f"qm: {where}task {final.task_id} ended {final.state}: {final.error}", file=sys.stderr)
    return final.state is not TaskState.SUCCEEDED


def _payload_lines(lines) -> Iterator[tuple[int, str]]:
    """(line number, payload) of each line that is not blank."""
    for number, line in enumerate(lines, 1):
        payload = line.rstrip("\r\n")
        if payload.strip():
            yield number, payload


def _batches(lines: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _submit_lines(client: Client, args, options: dict) -> int:
    """--from-file: submit_many in batches as the lines come; print each accepted id in order
    (unless waiting); name each refused line on stderr; then wait, with --wait."""
    try:
        source = contextlib.nullcontext(sys.stdin) if args.from_file == "-" else open(args.from_file, encoding="utf-8")
    except OSError as exc:
        print(f"qm: cannot read {args.from_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with source as lines:
        accepted, code = _submit_batches(client, args, options, _payload_lines(lines))
    return max(code, _wait_lines(client, args, accepted)) if args.wait else code


def _submit_batches(
    client: Client, args, options: dict, lines: Iterator[tuple[int, str]]
) -> tuple[list[tuple[int, str]], int]:
    accepted: list[tuple[int, str]] = []  # (line number, task id)
    code = 0
    for batch in _batches(lines, client.batch_items):
        keys = [
            {"idempotency_key": f"{args.idempotency_key}/{number}"} if args.idempotency_key else {}
            for number, _payload in batch
        ]
        try:
            items = [(args.type, payload, key) for (_, payload), key in zip(batch, keys, strict=True)]
            ids: list[str | None] = list(client.submit_many(items, **options))
        except BatchError as exc:
            ids = exc.task_ids
            for item in exc.refused:
                print(f"qm: line {batch[item.index][0]}: {item.code}: {item.message}", file=sys.stderr)
                code = max(code, EXIT_BAD_INPUT if item.code == "INVALID_ARGUMENT" else EXIT_TASK_FAILED)
        except RemoteError:
            print(f"qm: line {batch[0][0]} and after: not submitted", file=sys.stderr)
            raise
        for (number, _payload), task_id in zip(batch, ids, strict=True):
            if task_id is not None:
                accepted.append((number, task_id))
                if not args.wait:
                    print(json.dumps({"line": number, "id": task_id}) if args.json else task_id, flush=True)
    return accepted, code


def _wait_lines(client: Client, args, accepted: list[tuple[int, str]]) -> int:
    """--from-file --wait: print each result in the order of the lines, as soon as the ones
    before it are printed too."""
    order = [task_id for _number, task_id in accepted]
    line_of = dict((task_id, number) for number, task_id in accepted)
    finals: dict[str, TaskStatus] = {}
    printed, failed = 0, False
    try:
        for final in client.results(order, args.wait_timeout):
            finals[final.task_id] = final
            while printed < len(order) and order[printed] in finals:
                failed |= _print_final(finals[order[printed]], args, line_of[order[printed]])
                printed += 1
    except WaitTimeout as exc:
        for task_id in order[printed:]:
            if task_id in finals:
                failed |= _print_final(finals[task_id], args, line_of[task_id])
            else:
                print(f"qm: line {line_of[task_id]}: task {task_id} not finished", file=sys.stderr)
        print(
            f"qm: {len(exc.task_ids)} task(s) not finished within {exc.timeout_s:g} s; they go on: "
            f"qm watch {' '.join(exc.task_ids)}",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    return EXIT_TASK_FAILED if failed else 0


def cmd_status(client: Client, args) -> int:
    try:
        status = client.status(args.task_id)
    except RemoteError as exc:
        if exc.reason != Reason.TASK_NOT_FOUND:
            raise
        try:  # not a task: a group?
            group = client.group_status(args.task_id)
        except RemoteError as group_exc:
            if group_exc.reason == Reason.GROUP_NOT_FOUND:
                raise exc from None  # neither: the task's "not found" says it
            raise
        print(cli_groups.group_json(group, _when) if args.json else cli_groups.show_group(group, _when))
        return 0
    print(_as_json(status) if args.json else _show(status))
    return 0


def cmd_watch(client: Client, args) -> int:
    final: dict[str, str] = {}
    # On a terminal, progress reports redraw one bar line; state changes print lines above it.
    bar = not args.json and sys.stdout.isatty()
    bar_shown = False
    try:
        for status in client.watch(args.task_ids, args.wait_timeout):
            if bar and status.state is TaskState.RUNNING and status.progress_at is not None:
                width = shutil.get_terminal_size().columns - 1
                sys.stdout.write(CLEAR_LINE + _progress_bar(status)[:width])
                sys.stdout.flush()
                bar_shown = True
                continue
            if bar_shown:
                sys.stdout.write(CLEAR_LINE)
                bar_shown = False
            print(_as_json(status) if args.json else _change_line(status), flush=True)
            if status.terminal:
                final[status.task_id] = status.state
    except WaitTimeout as exc:
        if bar_shown:
            sys.stdout.write(CLEAR_LINE)
        print(f"qm: {exc}; they go on: qm watch {' '.join(exc.task_ids)}", file=sys.stderr)
        return EXIT_TIMEOUT
    return 0 if all(state is TaskState.SUCCEEDED for state in final.values()) else EXIT_TASK_FAILED


def cmd_workers(client: Client, args) -> int:
    listed = client.workers()
    for worker in listed:
        if args.json:
            print(json.dumps({**dataclasses.asdict(worker), "last_seen": _when(worker.last_seen)}))
        else:
            print(
                f"{worker.worker_id:<28} {worker.state:<8} {worker.host} pid {worker.pid} "
                f"busy {worker.busy}/{worker.procs} cpus {worker.busy_cpus}/{worker.procs} "
                f"queues {','.join(worker.queues)} "
                f"v{worker.version} last seen {_when(worker.last_seen)} "
                f"types {','.join(worker.types)}"
            )
    if not args.json:
        print(f"{sum(w.state == 'active' for w in listed)} active worker(s)")
    return 0


def cmd_types(client: Client, args) -> int:
    types, errors = client.task_types()
    for item in types:
        if args.json:
            print(json.dumps(dataclasses.asdict(item)))
            continue
        memory = f"{item.default_memory_limit_mb} MiB" if item.default_memory_limit_mb else "unlimited"
        print(
            f"{item.name:<20} {item.codec:<5} timeout {item.default_timeout_s:g} s"
            f"{' (max ' + format(item.max_timeout_s, 'g') + ' s)' if item.max_timeout_s else ''}, "
            f"memory {memory}, retries {item.default_max_retries}, priority {item.default_priority}"
            f"{', cpus ' + str(item.cpus) if item.cpus > 1 else ''}  {item.description}"
        )
    for error in errors:
        print(f"qm: server could not load a plugin: {error}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from qm.local import run_task

    logging.getLogger("qm").setLevel(logging.ERROR)  # the outcome line below says it all
    payload = sys.stdin.read() if args.payload == "-" else args.payload

    def show_progress(update: Progress) -> None:
        print(f"progress {update.fraction * 100:.0f}% {update.message}".rstrip(), file=sys.stderr, flush=True)

    outcome = run_task(
        args.type,
        payload,
        timeout_s=args.timeout,
        memory_limit_mb=args.memory_limit,
        soft_timeout_s=args.soft_timeout,
        on_progress=show_progress,
    )
    if outcome.succeeded:
        print(outcome.value if isinstance(outcome.value, str) else json.dumps(outcome.value))
        return 0
    print(f"qm: task ended {outcome.state}: {outcome.error}", file=sys.stderr)
    return EXIT_TASK_FAILED


def cmd_cancel(client: Client, args) -> int:
    status = client.cancel(args.task_id)
    print(f"{status.task_id} {status.state}")
    return 0


def _schedule_json(schedule: Schedule) -> str:
    data = dataclasses.asdict(schedule)
    if isinstance(data["payload"], bytes):
        data["payload"] = data["payload"].hex()
    for key in ("created_at", "next_fire_at", "last_fired_at"):
        data[key] = _when(data[key]) if data[key] is not None else None
    return json.dumps({"id": data.pop("schedule_id"), **data})


def _schedule_line(schedule: Schedule) -> str:
    line = (
        f"{schedule.schedule_id:<20} {schedule.when:<22} {schedule.type} {str(schedule.payload)[:40]!r} "
        f"next {_when(schedule.next_fire_at)} fires {schedule.fires} missed {schedule.missed_ticks} "
        f"({schedule.missed}) last {schedule.last_task_id or '-'}"
    )
    return line + (f" error: {schedule.last_error}" if schedule.last_error else "")


def cmd_schedule(client: Client, args) -> int:
    if args.schedule_command == "add":
        payload = sys.stdin.read() if args.payload == "-" else args.payload
        schedule = client.add_schedule(
            args.type,
            payload,
            cron=args.cron,
            every_s=args.every,
            timezone=args.tz,
            missed=args.missed,
            schedule_id=args.schedule_id,
            queue=args.queue,
            timeout_s=args.timeout,
            memory_limit_mb=args.memory_limit,
            soft_timeout_s=args.soft_timeout,
            max_retries=args.max_retries,
            retry_backoff_s=args.retry_backoff,
            retry_backoff_max_s=args.retry_backoff_max,
            retry_jitter=args.retry_jitter,
            retry_on_timeout=args.retry_on_timeout,
            priority=args.priority,
            cpus=args.cpus,
        )
        if args.json:
            print(_schedule_json(schedule))
        else:
            print(schedule.schedule_id)
            print(f"qm: first tick at {_when(schedule.next_fire_at)}", file=sys.stderr)
        return 0
    if args.schedule_command == "list":
        listed = client.list_schedules()
        for schedule in listed:
            print(_schedule_json(schedule) if args.json else _schedule_line(schedule))
        if not args.json:
            print(f"{len(listed)} schedule(s)")
        return 0
    removed = client.remove_schedule(args.schedule_id)
    print(f"removed {removed.schedule_id} ({removed.when}, {removed.fires} task(s) fired)")
    return 0


def cmd_dead(client: Client, args) -> int:
    if args.dead_command == "list":
        letters, total = client.dead_letters(args.limit)
        for letter in letters:
            if args.json:
                print(json.dumps({**dataclasses.asdict(letter), "dead_at": _when(letter.dead_at)}))
            else:
                print(
                    f"{_when(letter.dead_at)} {letter.task_id} {letter.type} {letter.state} "
                    f"attempts={letter.attempts}: {letter.reason}"
                )
        if not args.json:
            print(f"{total} dead letter(s)" + (f", {len(letters)} shown" if len(letters) < total else ""))
        return 0
    if args.dead_command == "requeue":
        if not args.all and not args.task_ids:
            print("qm: dead requeue: name dead task ids or use --all", file=sys.stderr)
            return EXIT_BAD_INPUT
        renamed = client.requeue_dead_letters(args.task_ids, all=args.all)
        for old, new in renamed.items():
            print(f"{old} -> {new}")
        print(f"requeued {len(renamed)} task(s) as new tasks")
        return 0
    print(f"purged {client.purge_dead_letters()} dead letter(s)")
    return 0


COMMANDS = {
    "submit": cmd_submit,
    "status": cmd_status,
    "submit-group": cli_groups.cmd_submit_group,
    "watch": cmd_watch,
    "workers": cmd_workers,
    "types": cmd_types,
    "cancel": cmd_cancel,
    "dead": cmd_dead,
    "schedule": cmd_schedule,
}


#: Exit status of a Unix tool whose reader went away (128 + SIGPIPE), as a shell reports it.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `qm` command; when the reader of its output goes away (`qm status ID | head
    -1`), stop quietly like a Unix tool: no traceback, exit 141."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "token":
            return cmd_token(args)
        config = load_config(
            args.config,
            overrides={
                "client.server": args.server,
                "client.tls_ca": args.tls_ca,
                "client.tls_cert": args.tls_cert,
                "client.tls_key": args.tls_key,
                "client.token": args.token,
            },
        )
        client_config = config.client
        with Client(
            client_config.server,
            tls_ca=client_config.tls_ca,
            token=client_config.token,
            tls_cert=client_config.tls_cert,
            tls_key=client_config.tls_key,
            stream_ids=client_config.stream_ids,
        ) as client:
            return COMMANDS[args.command](client, args)
    except (ConfigError, ValidationError) as exc:
        print(f"qm: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RemoteError as exc:
        print(f"qm: {exc}", file=sys.stderr)
        if exc.code is grpc.StatusCode.INVALID_ARGUMENT:
            return EXIT_BAD_INPUT
        if exc.code in DENIED_CODES:
            return EXIT_DENIED
        return EXIT_UNAVAILABLE if exc.code is grpc.StatusCode.UNAVAILABLE else EXIT_TASK_FAILED
    except TaskError as exc:
        print(f"qm: {exc}", file=sys.stderr)
        return EXIT_TASK_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
