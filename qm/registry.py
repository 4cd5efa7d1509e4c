"""Task types from plugins, in three pure phases: find → load → validate.

A plugin registers under the entry-point group `qm.tasks`; the entry point's name is
the task type. It resolves either to a `TaskType` or to a plain function
`f(payload: str) -> object` (text codec, defaults for everything else; the result is
`str()`-ed).

- find: list entry points, sorted by name; imports nothing.
- load: import each; an import error becomes a PluginError naming the distribution,
  and one broken plugin does not stop the others.
- validate: declarations are checked (names, codecs, duplicates); a plugin that names a
  built-in type (`math`, `python`, from the queuemaster distribution) is refused with an
  error naming both distributions, whatever the order: it cannot silently replace one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from typing import Any, Callable, Iterable

from qm import codecs, priority
from qm.errors import PluginError, UnknownTaskType, ValidationError

#: Entry-point group plugins register task types under.
ENTRY_POINT_GROUP = "qm.tasks"
#: Payload/result encodings a task type may declare.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
#: The distribution whose entry points are the built-in types, and their names.
BUILTIN_DISTRIBUTION = "queuemaster"
BUILTIN_TYPES = frozenset({"math", "python"})


@dataclasses.dataclass(frozen=True)
class TaskType:
    """A task type declaration: what runs, how payloads are encoded, what is accepted."""

    name: str
    handler: Callable[[Any], Any]
    codec: str = "text"
    validate: Callable[[Any], None] | None = None
    description: str = ""
    #: Limits: defaults apply when a submission sets none; maxima cap what it sets.
    default_timeout_s: float | None = None
    max_timeout_s: float | None = None
    default_memory_limit_mb: int | None = None
    max_memory_limit_mb: int | None = None
    #: Seconds into a run when the task gets qm.SoftTimeout (to clean up), unless the
    #: submission sets its own; None = never. Not armed for a submission whose time limit
    #: is not above it (qm/limits.py).
    soft_timeout_s: float | None = None
    #: Retry policy for this type (qm.retry.RetryPolicy); None = the server's default.
    retry: Any = None
    #: Priority 0-9 (higher runs first) a submission of this type gets unless it sets its
    #: own; None = qm.priority.DEFAULT_PRIORITY (5).
    priority: int | None = None
    #: CPU slots a task of this type takes on a worker unless the submission says (>= 1):
    #: a worker with --procs P runs at most P slots' worth at once. The task runs in one
    #: child and may use that many threads or processes (qm.task_cpus() says how many).
    cpus: int = 1
    #: Payloads up to this many bytes are checked on the server's event loop instead of a
    #: validator thread (qm/server/validators.py): the type vouches that checking one costs
    #: under ~100 us of CPU, less than the hand-over to a thread. 0 = always on a thread.
    inline_check_max_bytes: int = 0
    #: The distribution whose entry point declared it (set when loaded; "" if unknown); not
    #: part of equality: the same declaration is equal wherever it was loaded from.
    distribution: str = dataclasses.field(default="", compare=False)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TYPES and self.distribution == BUILTIN_DISTRIBUTION

    def decode_payload(self, payload: bytes) -> Any:
        """Bytes on the wire → the handler's argument (raises ValidationError)."""
        try:
            return codecs.decode_payload(self.codec, payload)
        except ValueError as exc:
            raise ValidationError("payload", f"not valid {self.codec} for task type {self.name!r}: {exc}") from exc

    def encode_result(self, value: Any) -> bytes:
        """The handler's return value → bytes on the wire."""
        return codecs.encode_result(self.codec, value)

    def check_payload(self, payload: bytes) -> None:
        """What the server runs at submit time: decodes, then the plugin's validator."""
        decoded = self.decode_payload(payload)
        if self.validate is not None:
            self.validate(decoded)


@dataclasses.dataclass(frozen=True)
class Registry:
    """The loaded task types by name, and the plugins that failed to load."""

    types: dict[str, TaskType]
    errors: tuple[PluginError, ...] = ()

    def get(self, name: str) -> TaskType:
        try:
            return self.types[name]
        except KeyError:
            raise UnknownTaskType(name, list(self.types)) from None


def find(group: str = ENTRY_POINT_GROUP) -> list[importlib.metadata.EntryPoint]:
    """Entry points of the group, sorted by name then value; nothing is imported."""
    return sorted(importlib.metadata.entry_points(group=group), key=lambda ep: (ep.name, ep.value))


def load(entry_points: Iterable[importlib.metadata.EntryPoint]) -> list[TaskType | PluginError]:
    """Import each entry point; a failure becomes a PluginError in its place."""
    return [_load_one(ep) for ep in entry_points]


def _load_one(ep: importlib.metadata.EntryPoint) -> TaskType | PluginError:
    package = ep.dist.name if ep.dist is not None else "unknown distribution"
    try:
        target = ep.load()
    except Exception as exc:  # any import-time failure of third-party code
        error = PluginError(
            f"plugin {ep.name!r} from {package} failed to load ({ep.value}): {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return error
    if isinstance(target, TaskType):
        return dataclasses.replace(target, name=ep.name, distribution=package)
    if callable(target):
        doc = (getattr(target, "__doc__", None) or "").strip().splitlines()
        return TaskType(name=ep.name, handler=target, description=doc[0] if doc else "", distribution=package)
    return PluginError(
        f"plugin {ep.name!r} from {package} resolves to {type(target).__name__}, "
        "expected a qm.registry.TaskType or a function"
    )


def validate(loaded: Iterable[TaskType | PluginError]) -> Registry:
    """Check declarations; bad or duplicate ones are reported, the rest are served."""
    types: dict[str, TaskType] = {}
    errors: list[PluginError] = []
    items = list(loaded)
    # Built-ins first, so no plugin sorted before them can take their name.
    items.sort(key=lambda item: not (isinstance(item, TaskType) and item.builtin))
    for item in items:
        if isinstance(item, PluginError):
            errors.append(item)
            continue
        problem = _check(item, types)
        if problem is not None:
            errors.append(problem)
        else:
            types[item.name] = item
    return Registry(types, tuple(errors))


def _check(task_type: TaskType, seen: dict[str, TaskType]) -> PluginError | None:
    if not _NAME_RE.match(task_type.name):
        return PluginError(f"task type name {task_type.name!r} is invalid: use letters, digits, _ . -")
    if task_type.codec not in codecs.CODECS:
        return PluginError(
            f"task type {task_type.name!r} declares codec {task_type.codec!r}; "
            f"expected one of {', '.join(codecs.CODECS)}"
        )
    for limit in (
        "default_timeout_s",
        "max_timeout_s",
        "default_memory_limit_mb",
        "max_memory_limit_mb",
        "soft_timeout_s",
    ):
        value = getattr(task_type, limit)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            return PluginError(
                f"task type {task_type.name!r} declares {limit}={value!r}; expected a positive number or None"
            )
    if task_type.priority is not None and priority.problem(task_type.priority):
        return PluginError(
            f"task type {task_type.name!r} declares priority={task_type.priority!r}; "
            f"expected 0 (lowest) to {priority.MAX_PRIORITY} (highest) or None"
        )
    if not (isinstance(task_type.cpus, int) and not isinstance(task_type.cpus, bool) and task_type.cpus >= 1):
        return PluginError(
            f"task type {task_type.name!r} declares cpus={task_type.cpus!r}; expected a whole number of at least 1"
        )
    inline = task_type.inline_check_max_bytes
    if not (isinstance(inline, int) and not isinstance(inline, bool) and inline >= 0):
        return PluginError(
            f"task type {task_type.name!r} declares inline_check_max_bytes={inline!r}; expected a whole number "
            "of bytes, 0 or more (0: every payload is checked on a validator thread)"
        )
    first = seen.get(task_type.name)
    if first is not None and (first.builtin or task_type.name in BUILTIN_TYPES):
        return PluginError(
            f"plugin {task_type.name!r} from {task_type.distribution or 'unknown distribution'} "
            f"would replace the built-in task type {task_type.name!r} from "
            f"{first.distribution or 'unknown distribution'}: refused; give the plugin's entry "
            "point another name"
        )
    if first is not None:
        return PluginError(f"task type {task_type.name!r} is registered twice; the first one is used")
    return None


def discover(group: str = ENTRY_POINT_GROUP) -> Registry:
    """find → load → validate for the installed plugins."""
    return validate(load(find(group)))
