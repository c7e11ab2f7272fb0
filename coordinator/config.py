"""Settings of ``novacron-coordinator`` (TOML, ``NOVACRON_COORDINATOR_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "NOVACRON_COORDINATOR"
DEFAULT_CONFIG = Path("/etc/novacron/coordinator.toml")


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 7800
    data_dir: Path = Path("/var/lib/novacron/coordinator")
    admin_token: str = ""  # API token with full rights; required
    agent_token: str = ""  # token agents use to register and heartbeat
    log_level: str = "info"
