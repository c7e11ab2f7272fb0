"""Settings of ``novacron-coordinator`` (TOML, ``NOVACRON_COORDINATOR_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from novacron import tls
from novacron.config import Invalid, check_port, check_secret
from novacron.connlimits import HttpLimits, check_http_limits
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
    admin_token: str = ""  # API token with full rights; required
    agent_token: str = ""  # token agents use to register and heartbeat
    log_level: str = "info"
    heartbeat_interval_s: float = 5.0  # what agents are told to use
    heartbeat_timeout_s: float = 20.0  # a host silent this long is marked down
    max_body_bytes: int = 256 * 1024  # larger request bodies get 413
    agent_timeout_s: float = 30.0  # one call to an agent's API
    poll_interval_s: float = 0.25  # how often a running migration's status is polled
    migration_timeout_s: float = 3600.0  # a migration not finished by then is failed
    audit_file: Path | None = None  # append-only audit log (default <data_dir>/audit.log)
    audit_fsync: bool = False  # fsync each audit line before replying (survives power loss)
    # how often VM records are checked against the VMs the agents report in heartbeats
    reconcile_interval_s: float = 30.0
    mcp: McpConfig = field(default_factory=McpConfig)
    http: HttpLimits = field(default_factory=HttpLimits)  # [http]: deadlines and connection cap
    # TLS (see novacron.tls): HTTPS with this certificate; client certificates are verified
    # against tls_ca and required from agents (their identity); the CLI may come without one.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    insecure: bool = False  # allow plain HTTP on a non-loopback address
    # Ed25519 key that signs migration grants (made on first start); coordinators sharing
    # one database must share this file. Empty: <data_dir>/grant-signing.key
    grant_key_file: str = ""


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
    check_secret(cfg, "admin_token", required=f"admin_token is required ({ENV_PREFIX}_ADMIN_TOKEN)")
    check_secret(cfg, "agent_token", required=f"agent_token is required ({ENV_PREFIX}_AGENT_TOKEN)")
    if cfg.admin_token == cfg.agent_token:
        raise Invalid("agent_token", "admin_token and agent_token must differ")
    for key in ("heartbeat_interval_s", "agent_timeout_s", "poll_interval_s", "migration_timeout_s",
                "reconcile_interval_s"):
        if not getattr(cfg, key) > 0:  # 0 would spin the loops these pace (and NaN compares false)
            raise Invalid(key, "must be positive")
    if cfg.heartbeat_timeout_s <= cfg.heartbeat_interval_s:
        raise Invalid("heartbeat_timeout_s", "heartbeat_timeout_s must be larger than heartbeat_interval_s")
    if cfg.max_body_bytes < 1024:
        raise Invalid("max_body_bytes", "must be at least 1024")
    check_level(cfg.log_level)
    check_port(cfg, "port")
    check_mcp(cfg.mcp)
    check_http_limits(cfg.http)
    tls.check(cfg)
