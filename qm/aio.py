"""qm.aio: the asyncio client of qm-server, `qm.aio.Client` (qm/client/aio.py)."""

from qm.client.aio import Client

__all__ = ["Client"]
