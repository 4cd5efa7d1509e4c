"""qm-server: gRPC API in front of RabbitMQ, with a SQLite replica of task state."""
