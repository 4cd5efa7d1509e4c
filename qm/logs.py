"""Logging setup shared by the commands: one line per event on stderr, either human-readable
text (the default) or one JSON object per line (``log.format: json``, for log collectors).

A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``process`` (qm-server, qm-worker, ...), ``pid`` and ``message``; ``task_id`` when the
event is about one task; ``exc`` with the traceback when one was logged. The task id comes
from ``extra={"task_id": ...}`` on the log call, else from a message of the form
``"task %s ..."`` (its first argument), which is how the server and worker word them.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

#: The values log.format accepts.
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process_name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        task_id = task_id_of(record)
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def task_id_of(record: logging.LogRecord) -> str | None:
    """The task a record is about: its `task_id` extra, else the first argument of a
    message worded "task %s ..."; None if neither."""
    task_id = getattr(record, "task_id", None)
    if task_id:
        return str(task_id)
    args = record.args
    if (
        isinstance(record.msg, str)
        and record.msg.startswith("task %s")
        and isinstance(args, tuple)
        and args
        and isinstance(args[0], str)
    ):
        return args[0]
    return None


def text_formatter(process_name: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {process_name}[%(process)d] %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str, process_name: str, fmt: str = "text") -> None:
    """Log records at `level` and above to stderr, as `fmt` ("text" or "json")."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name) if fmt == "json" else text_formatter(process_name))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Neither format shows the caller, the thread or the multiprocessing name: not looking
    # them up saves ~10 us of every record (a per-task line in the worker; issue 9). The
    # switches are the ones the logging HOWTO names under "Optimization".
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # pika logs every failed connection attempt several times over, at ERROR; our broker
    # module already says what matters, once, with the address and the cause.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
