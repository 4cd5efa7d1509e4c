"""Periodic schedules: when a schedule's ticks fall, and which tick fires after a gap.

A schedule says when with one of
- `cron`: a cron expression (croniter) of 5 fields, `minute hour day-of-month month
  day-of-week`, or of 6 with seconds FIRST (`*/5 * * * * *`: every 5 seconds), or an
  alias (`@hourly`, `@daily`, ...), read in `timezone` (IANA name; default UTC);
- `every_s`: a tick every S seconds, at whole multiples of S since 1970-01-01 UTC
  (every 60: each minute on the minute), 1 s at least.

Missed ticks (`missed`): when the servers get to a schedule late (all of them were down
over several ticks, or busy), the ticks due meanwhile are never all fired:
- `coalesce` (default): one task fires, for the latest tick due; the earlier ones are missed;
- `skip`: the latest tick due fires only if it is at most `grace_s` late
  (server.schedule_grace_s); otherwise nothing fires until the next tick.
Either way the schedule carries on from the first tick after now.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import zoneinfo

from croniter import croniter

from qm.errors import ValidationError

COALESCE, SKIP = "coalesce", "skip"
MISSED_POLICIES = (COALESCE, SKIP)
#: Shortest and longest interval of an `every_s` schedule.
MIN_EVERY_S = 1.0
MAX_EVERY_S = 366 * 86400.0
#: Default of server.schedule_grace_s: how late a tick may fire under the `skip` policy.
DEFAULT_GRACE_S = 30.0
#: Most missed ticks counted one by one (a cron schedule down for a long time is not walked further).
MAX_COUNTED_TICKS = 10_000
#: A schedule id: what `qm schedule remove` takes.
SCHEDULE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

_FIELD_NAMES_5 = ("minute", "hour", "day of month", "month", "day of week")
_FIELD_NAMES_6 = ("second",) + _FIELD_NAMES_5
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


@dataclasses.dataclass(frozen=True)
class When:
    """When a schedule ticks: `cron` (in `timezone`) or `every_s`, exactly one of them."""

    cron: str = ""
    every_s: float = 0.0
    timezone: str = "UTC"

    def check(self) -> When:
        """This, normalised; ValidationError naming the field (and the cron field) otherwise."""
        if bool(self.cron.strip()) == bool(self.every_s):
            raise ValidationError("cron", "give a cron expression or every_s (seconds), exactly one of them")
        zone = self.timezone.strip() or "UTC"
        _zone(zone)
        if self.every_s:
            if not math.isfinite(self.every_s) or not MIN_EVERY_S <= self.every_s <= MAX_EVERY_S:
                raise ValidationError(
                    "every_s", f"must be {MIN_EVERY_S:g} to {MAX_EVERY_S:g} seconds, got {self.every_s:g}"
                )
            return When("", float(self.every_s), zone)
        cron = " ".join(self.cron.split())
        check_cron(cron)
        return When(cron, 0.0, zone)

    def next_after(self, after_s: float) -> float:
        """The first tick strictly after `after_s` (epoch seconds)."""
        if self.every_s:
            return (math.floor(after_s / self.every_s) + 1) * self.every_s
        return _cron(self.cron, after_s, self.timezone).get_next(float)

    def latest_at_or_before(self, at_s: float) -> float:
        """The last tick at or before `at_s`."""
        if self.every_s:
            return math.floor(at_s / self.every_s) * self.every_s
        # croniter's get_prev is strictly before its start: start just after at_s.
        return _cron(self.cron, at_s + 1e-3, self.timezone).get_prev(float)

    def describe(self) -> str:
        if self.every_s:
            return f"every {self.every_s:g} s"
        return f"cron {self.cron!r}" + ("" if self.timezone == "UTC" else f" ({self.timezone})")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with a schedule found due: fire the tick `fire_s` (None: fire nothing),
    count `missed` ticks as missed, and wait for `next_s` next."""

    fire_s: float | None
    missed: int
    next_s: float


def decide(when: When, due_s: float, now_s: float, missed: str, grace_s: float = DEFAULT_GRACE_S) -> Decision:
    """A schedule whose next tick was `due_s` is looked at `now_s` (>= due_s): which tick
    fires under the `missed` policy, how many are missed, and the next tick after now."""
    latest = max(due_s, when.latest_at_or_before(now_s))
    passed = _ticks_between(when, due_s, latest)
    next_s = when.next_after(max(now_s, latest))
    if missed == SKIP and now_s - latest > grace_s:
        return Decision(None, passed, next_s)
    return Decision(latest, passed - 1, next_s)


def _ticks_between(when: When, first_s: float, last_s: float) -> int:
    """Ticks from `first_s` to `last_s`, both included (both ticks), counted up to MAX_COUNTED_TICKS."""
    if when.every_s:
        return min(MAX_COUNTED_TICKS, round((last_s - first_s) / when.every_s) + 1)
    count, tick = 1, first_s
    while tick < last_s and count < MAX_COUNTED_TICKS:
        tick = when.next_after(tick)
        count += 1
    return count


def check_missed(policy: str) -> str:
    policy = policy or COALESCE
    if policy not in MISSED_POLICIES:
        raise ValidationError("missed_ticks", f"must be one of {', '.join(MISSED_POLICIES)}, got {policy!r}")
    return policy


def check_schedule_id(schedule_id: str) -> str:
    if not SCHEDULE_ID.fullmatch(schedule_id):
        raise ValidationError("schedule_id", f"must be 1-100 of letters, digits, _ . : -, got {schedule_id[:120]!r}")
    return schedule_id


def check_cron(cron: str) -> None:
    """ValidationError naming the field of `cron` at fault: 5 fields (minute first) or 6
    (second first), or an @alias."""
    if cron.startswith("@"):
        if cron not in _ALIASES:
            raise ValidationError("cron", f"unknown alias {cron!r}; one of {', '.join(_ALIASES)}")
        return
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ValidationError(
            "cron",
            f"{cron!r} has {len(fields)} fields; give 5 (minute hour day-of-month month day-of-week) "
            "or 6 with seconds first (second minute hour day-of-month month day-of-week)",
        )
    names = _FIELD_NAMES_6 if len(fields) == 6 else _FIELD_NAMES_5
    for index, (name, value) in enumerate(zip(names, fields, strict=True)):
        alone = ["*"] * len(fields)
        alone[index] = value
        if not croniter.is_valid(" ".join(alone), second_at_beginning=True):
            raise ValidationError("cron", f"field {index + 1} ({name}) {value!r} is not valid in {cron!r}")
    if not croniter.is_valid(cron, second_at_beginning=True):
        raise ValidationError("cron", f"{cron!r} is not a valid cron expression")
    try:  # e.g. "0 0 30 2 *": valid fields, no day ever matches
        _cron(cron, 0.0, "UTC").get_next(float)
    except Exception as exc:  # croniter raises its own errors for an expression that never matches
        raise ValidationError("cron", f"{cron!r} never matches: {exc}") from None


def _zone(name: str) -> datetime.tzinfo:
    if name == "UTC":
        return datetime.timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            "timezone", f"unknown time zone {name!r}; give an IANA name such as Europe/Paris (or UTC)"
        ) from None


def _cron(cron: str, start_s: float, timezone: str) -> croniter:
    start = datetime.datetime.fromtimestamp(start_s, _zone(timezone))
    return croniter(cron, start, second_at_beginning=True)
