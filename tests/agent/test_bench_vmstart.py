"""``novacron bench vmstart --json`` runs end to end and reports both methods."""

from __future__ import annotations

import json
import subprocess

import pytest

from novacron.agent.guest import GuestImage


@pytest.mark.e2e
@pytest.mark.slow
def test_vmstart_bench_json(script_env: dict[str, str], guest: GuestImage) -> None:
    res = subprocess.run(["novacron", "bench", "vmstart", "--runs", "1", "--json"], env=script_env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["bench"] == "vmstart" and doc["runs"] == 1
    bare, api = doc["bare"], doc["agent_api"]
    assert 0 < bare["qmp_ready_s"] < bare["first_heartbeat_s"]
    assert 0 < api["ready_s"] < api["first_heartbeat_s"] and api["delete_s"] > 0
    assert doc["ratio_ready"] == pytest.approx(api["ready_s"] / bare["qmp_ready_s"])
