"""Settings of the claude-flow bridge, from ``NOVACRON_MCP_*`` environment variables.

They sit beside the coordinator's own settings rather than in them so the
bridge can be tuned without touching the coordinator's file; a bad value
stops the coordinator with the usual one-line config error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from novacron import config
from novacron.coordinator.mcp.client import ClientSettings

ENV_PREFIX = "NOVACRON_MCP"


@dataclass
class BridgeConfig:
    enabled: bool = True
    # argv of the MCP server, comma-separated in the environment; empty: the pinned claude-flow
    command: list[str] = field(default_factory=list)
    eager: bool = False  # start claude-flow with the coordinator instead of on first use
    call_timeout_s: float = 30.0
    start_timeout_s: float = 60.0
    ping_interval_s: float = 15.0
    attempts: int = 3

    def client_settings(self, workdir: Path) -> ClientSettings:
        problems = [
            name for name, value in (("call_timeout_s", self.call_timeout_s),
                                     ("start_timeout_s", self.start_timeout_s))
            if value <= 0
        ]
        if problems:
            raise config.ConfigError(f"environment {ENV_PREFIX}_*", problems[0], "must be positive")
        if self.ping_interval_s < 0:
            raise config.ConfigError(f"environment {ENV_PREFIX}_*", "ping_interval_s",
                                     "must be 0 (off) or positive")
        if not 1 <= self.attempts <= 10:
            raise config.ConfigError(f"environment {ENV_PREFIX}_*", "attempts", "must be 1..10")
        return ClientSettings(
            command=list(self.command) or None, workdir=workdir,
            call_timeout=self.call_timeout_s, start_timeout=self.start_timeout_s,
            ping_interval=self.ping_interval_s, attempts=self.attempts,
        )


def load_bridge_config() -> BridgeConfig:
    return config.load(BridgeConfig, env_prefix=ENV_PREFIX)
