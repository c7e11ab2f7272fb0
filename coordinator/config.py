"""Settings of ``novacron-coordinator`` (TOML, ``NOVACRON_COORDINATOR_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from novacron.config import Invalid, check_port
from novacron.logs import check_level

ENV_PREFIX = "NOVACRON_COORDINATOR"
DEFAULT_CONFIG = Path("/etc/novacron/coordinator.toml")


@dataclass
class McpConfig:
    """The claude-flow MCP bridge: ``[mcp]`` in the file, ``NOVACRON_COORDINATOR_MCP_*``, ``--mcp-*``."""

    enabled: bool = True
    # argv of the MCP server (a TOML list; comma-separated in env/flags); empty: the pinned claude-flow
    command: list[str] = field(default_factory=list)
    eager: bool = False  # start claude-flow with the coordinator instead of on first use
    call_timeout_s: float = 30.0
    start_timeout_s: float = 60.0
    ping_interval_s: float = 15.0  # health ping of a running claude-flow; 0: off
    attempts: int = 3  # tries of one call across claude-flow restarts


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 7800  # 0 picks a free port; the bound URL is written to <data_dir>/listen.json
    data_dir: Path = Path("/var/lib/novacron/coordinator")
    # PostgreSQL instead of <data_dir>/coordinator.db, shared by every coordinator of a fleet:
    # postgresql://user:password@host:port/db, or ...?host=/run/postgresql for a Unix socket
    database_url: str = ""
    database_pool_size: int = 10  # connections per coordinator
    lease_ttl_s: float = 10.0  # once-per-fleet loops move to another coordinator within this
    admin_token: str = ""  # API token with full rights; required
    agent_token: str = ""  # token agents use to register and heartbeat
    metrics_token: str = ""  # optional: may read /metrics only (for Prometheus); admin_token may too
    log_level: str = "info"
    heartbeat_interval_s: float = 5.0  # what agents are told to use
    heartbeat_timeout_s: float = 20.0  # a host silent this long is marked down
    # heartbeats in progress at once; past that the coordinator answers 503 + Retry-After
    # (agents back off with jitter) and marks no host down until it has caught up
    max_pending_heartbeats: int = 2000
    max_body_bytes: int = 256 * 1024  # larger request bodies get 413
    agent_timeout_s: float = 30.0  # one call to an agent's API
    poll_interval_s: float = 0.25  # how often a running migration's status is polled
    migration_timeout_s: float = 3600.0  # a migration not finished by then is failed
    mcp: McpConfig = field(default_factory=McpConfig)


def check_mcp(mcp: McpConfig) -> None:
    for key in ("call_timeout_s", "start_timeout_s"):
        if not getattr(mcp, key) > 0:
            raise Invalid(f"mcp.{key}", "must be positive")
    if not mcp.ping_interval_s >= 0:
        raise Invalid("mcp.ping_interval_s", "must be 0 (off) or positive")
    if not 1 <= mcp.attempts <= 10:
        raise Invalid("mcp.attempts", "must be 1..10")


def check_config(cfg: CoordinatorConfig) -> None:
    """Values that parse but cannot work; ``config.load(check=...)`` names where each came from."""
    if not cfg.admin_token:
        raise Invalid("admin_token", f"admin_token is required ({ENV_PREFIX}_ADMIN_TOKEN)")
    if not cfg.agent_token:
        raise Invalid("agent_token", f"agent_token is required ({ENV_PREFIX}_AGENT_TOKEN)")
    if cfg.admin_token == cfg.agent_token:
        raise Invalid("agent_token", "admin_token and agent_token must differ")
    if cfg.metrics_token and cfg.metrics_token in (cfg.admin_token, cfg.agent_token):
        raise Invalid("metrics_token", "metrics_token must differ from admin_token and agent_token")
    for key in ("heartbeat_interval_s", "agent_timeout_s", "poll_interval_s", "migration_timeout_s"):
        if not getattr(cfg, key) > 0:  # 0 would spin the loops these pace (and NaN compares false)
            raise Invalid(key, "must be positive")
    if cfg.heartbeat_timeout_s <= cfg.heartbeat_interval_s:
        raise Invalid("heartbeat_timeout_s", "heartbeat_timeout_s must be larger than heartbeat_interval_s")
    if cfg.database_url and not cfg.database_url.startswith(("postgresql://", "postgres://")):
        raise Invalid("database_url", "must be a postgresql:// URL (empty: SQLite in data_dir)")
    if not 1 <= cfg.max_pending_heartbeats <= 1_000_000:
        raise Invalid("max_pending_heartbeats", "must be 1..1000000")
    if not 1 <= cfg.database_pool_size <= 1000:
        raise Invalid("database_pool_size", "must be 1..1000")
    if not cfg.lease_ttl_s >= 1:
        raise Invalid("lease_ttl_s", "must be at least 1 second")
    if cfg.max_body_bytes < 1024:
        raise Invalid("max_body_bytes", "must be at least 1024")
    check_level(cfg.log_level)
    check_port(cfg, "port")
    check_mcp(cfg.mcp)
