"""The systemd units in deploy/systemd: valid for systemd (`systemd-analyze verify`, the
real parser; no systemd runs here as PID 1, so the stop behaviour they rely on is proven
by tests/integration/test_worker_stop.py with the same signals), and consistent with the
settings they depend on."""
from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys

import pytest

from qm.config import load_config
from tests.requirements import missing

UNITS = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "systemd"
BIN = pathlib.Path(sys.executable).parent


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


@pytest.mark.parametrize("name", ["qm-worker.service", "qm-server.service"])
def test_unit_passes_systemd_analyze_verify(name, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing("systemd-analyze (Debian package systemd)")
    text = (UNITS / name).read_text().replace("/opt/queuemaster/.venv/bin/", f"{BIN}/")
    copy = tmp_path / name
    copy.write_text(text.replace("User=qm\n", "User=root\n").replace("Group=qm\n", "Group=root\n"))
    verified = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                              timeout=60)
    problems = [line for line in (verified.stdout + verified.stderr).splitlines()
                if name in line and "Documentation" not in line]
    assert verified.returncode == 0 and not problems, verified.stdout + verified.stderr


def test_worker_unit_stops_by_draining_within_its_stop_timeout():
    service = unit("qm-worker.service")["Service"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    drain_s = load_config(None, env={}).worker.drain_timeout_s
    assert seconds(service["TimeoutStopSec"]) > drain_s  # never SIGKILLed mid-drain


def test_server_unit_keeps_its_store_in_its_state_directory():
    service = unit("qm-server.service")["Service"]
    assert "--data-dir /var/lib/queuemaster" in service["ExecStart"]
    assert service["StateDirectory"] == "queuemaster" and "/var/lib/queuemaster" in service["ReadWritePaths"]
    grace_s = load_config(None, env={}).server.grace_s
    assert seconds(service["TimeoutStopSec"]) > grace_s
