"""Test tooling shipped with QueueMaster.

- `run_task(type, payload, timeout_s=..., memory_limit_mb=...)`: run a task type through
  the real child-process pool with its limits enforced, no server or broker — for a
  plugin's own pytest suite.
- `qm.testing.rabbitmq.LocalRabbitMQ`: a throwaway RabbitMQ node on loopback.
"""
from qm.local import LocalResult, run_task

__all__ = ["LocalResult", "run_task"]
