"""Clients of qm-server: the Python `Client` and the `qm` command line built on it."""
