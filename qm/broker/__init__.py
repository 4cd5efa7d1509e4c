"""Broker seam: one small async interface, a RabbitMQ implementation and an in-memory one."""
