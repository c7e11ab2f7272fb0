"""`novacron bench mcp` runs end to end with tiny counts and reports both sides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from novacron.bench.mcp import percentile

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_percentile_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_bench_mcp_json(claude_flow_argv: list[str], script_env: dict[str, str],
                        tmp_path: Path) -> None:
    novacron = str(Path(sys.executable).parent / "novacron")
    home = tmp_path / "home"
    home.mkdir()
    # a HOME of its own, the real install cache
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env = {**script_env, "HOME": str(home), "XDG_CACHE_HOME": cache}
    out = subprocess.run([novacron, "bench", "mcp", "--json", "--calls", "20", "--spawns", "1"],
                         capture_output=True, text=True, timeout=240, env=env, check=True)
    # claude-flow's registry update check (it writes ~/.claude-flow/update-state.json) is off
    assert not (home / ".claude-flow").exists()
    doc = json.loads(out.stdout)
    assert doc["bench"] == "mcp"
    for key in ("session", "session_ping", "spawn_direct", "spawn_npx"):
        assert doc[key]["p50_ms"] > 0 and doc[key]["p99_ms"] >= doc[key]["p50_ms"]
    assert doc["session"]["calls"] == 20 and doc["spawn_npx"]["calls"] == 1
    # spawning a node process per call cannot beat a round trip on a live session
    assert doc["spawn_direct"]["p50_ratio_vs_session"] > 1
    bad = subprocess.run([novacron, "bench", "mcp", "--calls", "0"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode != 0 and "--calls must be" in bad.stderr
