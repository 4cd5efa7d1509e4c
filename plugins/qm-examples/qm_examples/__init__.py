"""Example QueueMaster task types for CPU-heavy work.

Each module declares one ``TASK_TYPE`` (a ``qm.registry.TaskType``) registered through
an entry point in the group ``qm.tasks`` (see pyproject.toml):

- ``examples.primes``         (json) ``{"below": N}`` → ``{"below": N, "count": C}``
- ``examples.hash_chain``     (text) ``"ROUNDS:SEED"`` → hex digest of iterated SHA-256
- ``examples.monte_carlo_pi`` (json) ``{"samples": N, "seed": S}`` → ``{"pi": estimate}``

Importing this package does nothing else: worker forkservers preload plugin modules,
so import time stays free of work and side effects.
"""

__version__ = "0.1.0"
