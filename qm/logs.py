"""Logging setup shared by the commands: one human-readable line per event on stderr."""
from __future__ import annotations

import logging
import sys


def setup_logging(level: str, process_name: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, force=True,
        format=f"%(asctime)s {process_name}[%(process)d] %(levelname)s %(name)s: %(message)s")
    # pika logs every failed connection attempt several times over, at ERROR; our broker
    # module already says what matters, once, with the address and the cause.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
