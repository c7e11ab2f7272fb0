"""The coordinator's settings checks: each bad value is one error naming its source and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron import config
from novacron.agent.coordinator_link import _interval
from novacron.coordinator.config import ENV_PREFIX, CoordinatorConfig, McpConfig, check_config

TOKENS = {f"{ENV_PREFIX}_ADMIN_TOKEN": "adm-0123456789abcdef", f"{ENV_PREFIX}_AGENT_TOKEN": "agt-0123456789abcdef"}


def load(environ: dict[str, str], path: Path | None = None) -> CoordinatorConfig:
    return config.load(CoordinatorConfig, path=path, env_prefix=ENV_PREFIX,
                       environ={**TOKENS, **environ}, check=check_config)


@pytest.mark.parametrize(("name", "value", "key", "problem"), [
    ("POLL_INTERVAL_S", "0", "poll_interval_s", "must be positive"),
    ("HEARTBEAT_INTERVAL_S", "nan", "heartbeat_interval_s", "must be positive"),
    ("AGENT_TIMEOUT_S", "-1", "agent_timeout_s", "must be positive"),
    ("MAX_BODY_BYTES", "10", "max_body_bytes", "must be at least 1024"),
    ("MCP_START_TIMEOUT_S", "0", "mcp.start_timeout_s", "must be positive"),
    ("MCP_PING_INTERVAL_S", "nan", "mcp.ping_interval_s", "must be 0 (off) or positive"),
    ("MCP_ATTEMPTS", "11", "mcp.attempts", "must be 1..10"),
    ("ADMIN_TOKEN", "short", "admin_token", "too short: at least 16 characters, got 5 (e.g. from `openssl rand -hex 16`)"),
    ("HTTP_HEADER_TIMEOUT_S", "0", "http.header_timeout_s", "must be more than 0 and at most 3600 seconds"),
    ("HTTP_MAX_CONNECTIONS", "-5", "http.max_connections", "must be 0 (automatic) or positive"),
    ("MIGRATION_LIMIT_FLEET", "0", "migration_limit_fleet", "must be 1..10000"),
    ("MIGRATION_LIMIT_OUTBOUND", "-1", "migration_limit_outbound", "must be 1..10000"),
    ("MIGRATION_LIMIT_INBOUND", "100000", "migration_limit_inbound", "must be 1..10000"),
])
def test_bad_values_name_source_and_key(name: str, value: str, key: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        load({f"{ENV_PREFIX}_{name}": value})
    assert str(err.value) == f"environment {ENV_PREFIX}_{name}: key '{key}': {problem}"


def test_mcp_section_from_file_env_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[mcp]\ncommand = ["node", "server.js"]\neager = true\nattempts = 5\n')
    cfg = load({f"{ENV_PREFIX}_MCP_ATTEMPTS": "2"}, f)
    assert cfg.mcp == McpConfig(command=["node", "server.js"], eager=True, attempts=2)
    assert load({}).mcp == McpConfig()
    f.write_text("[mcp]\nattempts = 0\n")
    with pytest.raises(config.ConfigError) as err:
        load({}, f)
    assert str(err.value) == f"{f}: key 'mcp.attempts': must be 1..10"
    f.write_text("[mcp]\nretries = 3\n")
    with pytest.raises(config.ConfigError, match=r"key 'mcp\.retries': unknown key"):
        load({}, f)


def test_link_keeps_the_heartbeat_interval_sane() -> None:
    assert _interval({"heartbeat_interval_s": 2}, 5.0) == 2.0
    assert _interval({"heartbeat_interval_s": 0}, 5.0) == 0.05  # never a busy loop
    assert _interval({"heartbeat_interval_s": 1e9}, 5.0) == 300.0
    for junk in ("soon", None, float("nan"), [1]):
        assert _interval({"heartbeat_interval_s": junk}, 5.0) == 5.0
    assert _interval("not a dict", 5.0) == 5.0
