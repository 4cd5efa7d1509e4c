"""qm-worker: a supervisor feeding a pool of child processes with tasks from RabbitMQ."""
