"""The console scripts: --help, bad config, and the installed namespace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = ["novacron", "novacron-agent", "novacron-coordinator"]


def run(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str, script_env: dict[str, str]) -> None:
    res = run([script, "--help"], script_env)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_config_is_one_clear_line(script: str, script_env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("log_level = 7\n")
    args = [script, "--config", str(cfg)] + (["bench", "nothing"] if script == "novacron" else [])
    res = run(args, script_env)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(cfg) in lines[0] and "log_level" in lines[0] and "expected a string" in lines[0]


def test_env_var_config_error_names_the_variable(script_env: dict[str, str]) -> None:
    env = dict(script_env, NOVACRON_AGENT_PORT="seven")
    res = run(["novacron-agent"], env)
    assert res.returncode != 0
    assert "NOVACRON_AGENT_PORT" in res.stderr


def test_namespace_only(script_env: dict[str, str], tmp_path: Path) -> None:
    """Installed modules live under novacron.*; nothing generic is importable."""
    code = (
        "import importlib.util as u, novacron.agent, novacron.coordinator, novacron.native, "
        "novacron.bench, novacron.models\n"
        "bad = [m for m in ('agent', 'coordinator', 'native', 'bench', 'models') if u.find_spec(m)]\n"
        "assert not bad, bad\n"
    )
    import sys

    res = run([sys.executable, "-c", code], script_env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_bench_lists_and_rejects_unknown(script_env: dict[str, str]) -> None:
    res = run(["novacron", "bench", "no-such-bench"], script_env)
    assert res.returncode == 2
    assert "unknown benchmark" in res.stderr
