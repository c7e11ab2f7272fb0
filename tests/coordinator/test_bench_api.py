"""``novacron bench api`` runs end to end (small sizes) and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.e2e
def test_bench_api_reports_rates_beside_references(script_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "novacron.cli.main", "bench", "api", "--agents", "40",
         "--rounds", "3", "--concurrency", "8", "--json"],
        env=script_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bench"] == "api" and doc["heartbeats"] == 120
    for key in ("heartbeat_rate_per_s", "health_rate_per_s", "raw_sqlite_rate_per_s",
                "heartbeat_p99_ms"):
        assert doc[key] > 0, key
    assert doc["heartbeat_p99_ms"] >= doc["heartbeat_p50_ms"]
    assert doc["heartbeat_vs_health"] == pytest.approx(
        doc["heartbeat_rate_per_s"] / doc["health_rate_per_s"])


def test_bench_api_refuses_silly_sizes(script_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "novacron.cli.main", "bench", "api", "--agents", "0"],
        env=script_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--agents" in proc.stderr
