"""Ids that sort by creation time (qm/ids.py): still UUIDs, unique, and in time order."""
from __future__ import annotations

import time
import uuid

from qm import ids


def test_an_id_is_a_version_7_uuid_carrying_the_time_it_was_made():
    before_ms = time.time_ns() // 1_000_000
    made = uuid.UUID(ids.time_ordered_id())
    after_ms = time.time_ns() // 1_000_000
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert before_ms <= made.int >> 80 <= after_ms
    assert len(str(made)) == 36


def test_the_fallback_has_the_same_layout():
    made = ids._uuid7()
    assert made.version == 7 and made.variant == uuid.RFC_4122


def test_ids_made_later_sort_after_and_none_repeats():
    first = [ids.time_ordered_id() for _ in range(1000)]
    deadline = time.monotonic() + 5.0
    while time.time_ns() // 1_000_000 <= uuid.UUID(first[-1]).int >> 80 and time.monotonic() < deadline:
        time.sleep(0.001)  # into the next millisecond
    later = [ids.time_ordered_id() for _ in range(1000)]
    assert max(first) < min(later)
    assert len(set(first + later)) == 2000
