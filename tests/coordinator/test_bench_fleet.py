"""``novacron bench fleet`` runs end to end at a small size on SQLite and on two
coordinators sharing a PostgreSQL, and reports what the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_fleet_small(script_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "novacron.cli.main", "bench", "fleet", "--hosts", "40",
         "--vms-per-host", "3", "--interval", "0.5", "--seconds", "3", "--placements", "4",
         "--scenario", "sqlite:1", "postgres:2", "--coordinator-cpus", "0.5", "--json"],
        env=script_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["bench"] == "fleet"
    results = doc["results"]
    assert [(r["backend"], r["coordinators"]) for r in results] == [("sqlite", 1), ("postgres", 2)]
    for r in results:
        assert r["hosts"] == 40 and r["vms"] == 120
        assert r["errors"] == 0 and r["first_error"] is None, r
        assert r["false_downs"] == 0 and r["down_at_end"] == 0, r
        # every simulated agent keeps its pace (80 heartbeats/s expected)
        assert r["heartbeats_per_s"] == pytest.approx(r["expected_per_s"], rel=0.25), r
        assert 0 < r["heartbeat_p50_ms"] <= r["heartbeat_p99_ms"]
        assert r["placements_failed"] == 0 and r["placements_per_s"] > 0, r
        # each coordinator under its quota; the simulator says how late it ran itself
        assert r["coordinator_cpu_quota"] == 0.5 and all(c <= 0.55 for c in r["coordinator_cpu"]), r
        assert r["client_lag_p99_ms"] is not None and r["client_gc_max_ms"] >= 0, r
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")):  # v2, v1: removed
        assert not list(base.glob("novacron-bench-coordinator-*"))


def test_bench_fleet_refuses_bad_scenarios(script_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "novacron.cli.main", "bench", "fleet", "--scenario", "sqlite:2"],
        env=script_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "scenario" in proc.stderr
