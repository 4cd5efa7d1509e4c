"""Test tooling shipped with QueueMaster (a throwaway local RabbitMQ, later plugin helpers)."""
