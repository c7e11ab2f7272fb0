"""Settings of ``novacron-coordinator`` (TOML, ``NOVACRON_COORDINATOR_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "NOVACRON_COORDINATOR"
DEFAULT_CONFIG = Path("/etc/novacron/coordinator.toml")


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 7800  # 0 picks a free port; the bound URL is written to <data_dir>/listen.json
    data_dir: Path = Path("/var/lib/novacron/coordinator")
    admin_token: str = ""  # API token with full rights; required
    agent_token: str = ""  # token agents use to register and heartbeat
    log_level: str = "info"
    heartbeat_interval_s: float = 5.0  # what agents are told to use
    heartbeat_timeout_s: float = 20.0  # a host silent this long is marked down
    max_body_bytes: int = 256 * 1024  # larger request bodies get 413
    agent_timeout_s: float = 30.0  # one call to an agent's API
    poll_interval_s: float = 0.25  # how often a running migration's status is polled
    migration_timeout_s: float = 3600.0  # a migration not finished by then is failed
