"""The claude-flow bridge's client settings, from the coordinator's ``[mcp]`` section.

The values are checked with the rest of the coordinator's config at start-up
(``novacron.coordinator.config.check_config``); they are checked again here
for apps built from settings made in code.
"""

from __future__ import annotations

from pathlib import Path

from novacron import config
from novacron.coordinator.config import McpConfig, check_mcp
from novacron.coordinator.mcp.client import ClientSettings


def client_settings(mcp: McpConfig, workdir: Path) -> ClientSettings:
    try:
        check_mcp(mcp)
    except config.Invalid as exc:
        raise config.ConfigError(config.DEFAULTS, exc.key, exc.problem) from None
    return ClientSettings(
        command=list(mcp.command) or None, workdir=workdir,
        call_timeout=mcp.call_timeout_s, start_timeout=mcp.start_timeout_s,
        ping_interval=mcp.ping_interval_s, attempts=mcp.attempts,
    )
