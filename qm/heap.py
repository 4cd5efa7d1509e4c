"""The server's start-up heap, set aside from Python's cyclic garbage collector.

qm-server holds tens of thousands of objects made at start-up (modules, gRPC, pika, the
store) that live as long as it does. Every full collection walked them all again while
the loop (every call and stream) waited: up to 41 ms a pass on the 2-core test machine.
Frozen (`gc.freeze`) once start-up is done, they are left out of later passes (6 ms at
most; load/README.md, "The server's start-up heap"). Start-up garbage is collected first,
so nothing is kept that a collection would have freed.
"""

from __future__ import annotations

import gc


def freeze_start_up_objects() -> int:
    """Collect start-up garbage, then exempt every object alive now from later
    collections. Returns how many objects are frozen (for the log)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
