"""Test tooling shipped with QueueMaster.

- `run_task(type, payload, timeout_s=..., memory_limit_mb=...)`: run a task type through
  the real child-process pool with its limits enforced, no server or broker — for a
  plugin's own pytest suite.
- `qm.testing.rabbitmq.LocalRabbitMQ`: a throwaway RabbitMQ node on loopback.
- `qm.testing.rabbitmq_cluster.LocalRabbitMQCluster`: several such nodes joined as one
  RabbitMQ cluster (for `broker.urls` and failover).
"""

from qm.local import LocalResult, run_task

__all__ = ["LocalResult", "run_task"]
