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


@pytest.mark.parametrize(("mcp_toml", "flags", "source", "key", "problem"), [
    ("attempts = 0", [], "{file}", "mcp.attempts", "must be 1..10"),
    ("ping_interval_s = -1.0", [], "{file}", "mcp.ping_interval_s", "must be 0 (off) or positive"),
    ("call_timeout_s = 'soon'", [], "{file}", "mcp.call_timeout_s", "expected a number"),
    ("attempts = 2", ["--mcp-attempts", "11"], "flag --mcp-attempts", "mcp.attempts", "must be 1..10"),
])
def test_coordinator_bad_mcp_setting_is_one_line(
        script_env: dict[str, str], tmp_path: Path, mcp_toml: str, flags: list[str], source: str,
        key: str, problem: str) -> None:
    """The bridge's settings are the coordinator's [mcp] section, checked before anything starts."""
    cfg = tmp_path / "coordinator.toml"
    data = tmp_path / "data"
    cfg.write_text(f'admin_token = "adm-1-0123456789abcdef"\nagent_token = "agt-1-0123456789abcdef"\nport = 0\ndata_dir = "{data}"\n'
                   f"[mcp]\n{mcp_toml}\n")
    res = run(["novacron-coordinator", "--config", str(cfg), *flags], script_env)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"novacron-coordinator: config error: {source.format(file=cfg)}: "
                               f"key '{key}': {problem}"), res.stderr
    assert not data.exists()  # refused before the data dir or store was made


@pytest.mark.parametrize(("args", "needle"), [
    (["novacron", "--log-level", "loud", "hosts"],
     "flag --log-level: key 'log_level': expected one of debug, info"),
    (["novacron-agent", "--token", "tok-1-0123456789abcdef", "--log-level", "loud"],
     "flag --log-level: key 'log_level': expected one of debug, info"),
    (["novacron-agent", "--token", "tok-1-0123456789abcdef", "--data-port", "70000"],
     "flag --data-port: key 'data_port': expected a port number 0..65535"),
    (["novacron-coordinator", "--admin-token", "a-1-0123456789abcdef", "--agent-token", "b-1-0123456789abcdef", "--port", "-1"],
     "flag --port: key 'port': expected a port number 0..65535"),
    # every token and secret is at least 16 characters, checked by the daemon itself
    (["novacron-coordinator", "--admin-token", "x", "--agent-token", "b-1-0123456789abcdef"],
     "flag --admin-token: key 'admin_token': too short: at least 16 characters, got 1"),
    (["novacron-coordinator", "--admin-token", "a-1-0123456789abcdef", "--agent-token", "b" * 15],
     "flag --agent-token: key 'agent_token': too short: at least 16 characters, got 15"),
    (["novacron-agent", "--token", "tok-1"], "flag --token: key 'token': too short"),
    (["novacron-agent", "--token", "tok-1-0123456789abcdef", "--cluster-secret", "s" * 8],
     "flag --cluster-secret: key 'cluster_secret': too short"),
    (["novacron-agent", "--token", "tok-1-0123456789abcdef", "--coordinator-token", "short"],
     "flag --coordinator-token: key 'coordinator_token': too short"),
])
def test_values_that_cannot_work_are_one_line(script_env: dict[str, str], tmp_path: Path,
                                               args: list[str], needle: str) -> None:
    env = dict(script_env, HOME=str(tmp_path), NOVACRON_AGENT_STATE_DIR=str(tmp_path / "agent"),
               NOVACRON_COORDINATOR_DATA_DIR=str(tmp_path / "coord"))
    res = run(args, env)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{args[0]}: config error: {needle}"), res.stderr
    assert not (tmp_path / "agent").exists() and not (tmp_path / "coord").exists()
