"""`qm types` against a running server, and `qm run` with no server at all."""
from __future__ import annotations

import json

from tests.processes import run_qm


def test_qm_types_lists_the_servers_task_types_with_codec_and_limits(stack):
    result = run_qm("types", server=stack.server.address)
    as_json = run_qm("types", "--json", server=stack.server.address)

    assert result.returncode == 0, result.stderr
    assert any(line.startswith("math ") and "text" in line for line in result.stdout.splitlines()), result.stdout
    types = {item["name"]: item for item in map(json.loads, as_json.stdout.splitlines())}
    assert types["math"]["codec"] == "text"
    assert types["math"]["default_timeout_s"] > 0
    assert "Safe arithmetic" in types["math"]["description"]


def test_qm_run_needs_no_server_and_enforces_limits():
    ok = run_qm("run", "-T", "math", "-P", "1 + 2 * 5", server="127.0.0.1:1")
    late = run_qm("run", "-T", "test.stubborn", "-P", "30", "--timeout", "1", server="127.0.0.1:1")
    bad = run_qm("run", "-T", "math", "-P", "1 +", server="127.0.0.1:1")

    assert (ok.returncode, ok.stdout) == (0, "11\n"), ok.stderr
    assert late.returncode == 1 and "TIMED_OUT" in late.stderr, late.stderr
    assert bad.returncode == 2 and "payload" in bad.stderr, bad.stderr
