"""Settings of ``novacron-coordinator`` (TOML, ``NOVACRON_COORDINATOR_*`` env, flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron import tls
from novacron.config import Invalid, check_port, check_secret, setting
from novacron.connlimits import HttpLimits, check_http_limits
from novacron.logs import check_level

ENV_PREFIX = "NOVACRON_COORDINATOR"
DEFAULT_CONFIG = Path("/etc/novacron/coordinator.toml")


@dataclass
class McpConfig:
    """The claude-flow MCP bridge: ``[mcp]`` in the file, ``NOVACRON_COORDINATOR_MCP_*``, ``--mcp-*``."""

    enabled: bool = setting(True, help="serve the claude-flow MCP bridge")
    command: list[str] = setting(factory=list, help="argv of the MCP server (a TOML list; "
                                 "comma-separated in env/flags); empty: the pinned claude-flow")
    eager: bool = setting(False, help="start claude-flow with the coordinator instead of on first use")
    call_timeout_s: float = setting(30.0, help="seconds one MCP call may take")
    start_timeout_s: float = setting(60.0, help="seconds claude-flow may take to start")
    ping_interval_s: float = setting(15.0, help="seconds between health pings of a running "
                                     "claude-flow; 0: off")
    attempts: int = setting(3, help="tries of one call across claude-flow restarts (1..10)")


@dataclass
class CoordinatorConfig:
    host: str = setting("127.0.0.1", help="address the REST API listens on")
    port: int = setting(7800, help="TCP port of the REST API; 0 picks a free one (the bound URL "
                        "is written to <data_dir>/listen.json)")
    data_dir: Path = setting(Path("/var/lib/novacron/coordinator"),
                             help="directory of the fleet database, audit log and listen.json")
    database_url: str = setting("", help="PostgreSQL shared by every coordinator of a fleet instead "
                                "of <data_dir>/coordinator.db: postgresql://user:password@host:port/db "
                                "or ...?host=/run/postgresql for a Unix socket (empty: SQLite)")
    database_pool_size: int = setting(10, help="PostgreSQL connections per coordinator")
    lease_ttl_s: float = setting(10.0, help="seconds within which once-per-fleet loops move to "
                                 "another coordinator when their holder dies")
    admin_token: str = setting("", help="API token with full rights; required, 16+ characters")
    agent_token: str = setting("", help="token agents use to register and heartbeat; required, "
                               "16+ characters, not the admin token")
    metrics_token: str = setting("", help="optional token that may read /metrics only (for "
                                 "Prometheus); admin_token may too")
    log_level: str = setting("info", help="debug, info, warning or error")
    heartbeat_interval_s: float = setting(5.0, help="seconds between heartbeats agents are told to use")
    heartbeat_timeout_s: float = setting(20.0, help="seconds a host may stay silent before it is "
                                         "marked down")
    max_pending_heartbeats: int = setting(2000, help="heartbeats taken but not yet written to the "
                                          "database; past that the coordinator answers 503 + "
                                          "Retry-After and marks no host down until it has caught up")
    max_body_bytes: int = setting(256 * 1024, help="largest request body in bytes; larger ones get 413")
    agent_timeout_s: float = setting(30.0, help="seconds one call to an agent's API may take")
    poll_interval_s: float = setting(0.25, help="seconds between polls of a running migration's status")
    migration_timeout_s: float = setting(3600.0, help="seconds after which an unfinished migration "
                                         "is failed")
    migration_limit_outbound: int = setting(2, help="migrations one host may send at once; more "
                                            "are queued (phase 'queued') and start when one ends")
    migration_limit_inbound: int = setting(2, help="migrations one host may receive at once; more "
                                           "are queued")
    migration_limit_fleet: int = setting(8, help="migrations the whole fleet may run at once; more "
                                         "are queued")
    migration_on_no_converge: str = setting(
        "abort", help="default policy when pre-copy cannot reach a migration's downtime budget: "
        "abort (the VM keeps running on its source; the migration fails with the figures) or "
        "force (stop-and-copy anyway; the longer pause is reported as budget_exceeded) or postcopy "
        "(QEMU moves the RAM; not converged, the VM runs at the destination while its remaining "
        "pages follow on demand)")
    migration_policies: dict[str, dict[str, Any]] = setting(
        factory=dict, help="named sets of migration options: [migration_policies.NAME] tables of "
        "the agent's options (bandwidth_mbps, downtime_ms, max_rounds, throttle, compression_level, "
        "dedup, ...), an optional selector = {label = \"value\"} choosing VMs by their labels and "
        "a description (JSON in env/flags; see the README's Migration policies)")
    default_migration_policy: str = setting("", help="policy of a migration that names none and "
                                            "whose VM names or matches none (empty: the agent's "
                                            "defaults)")
    audit_file: Path | None = setting(None, help="append-only audit log (empty: <data_dir>/audit.log)")
    audit_fsync: bool = setting(False, help="fsync each audit line before replying (survives power loss)")
    reconcile_interval_s: float = setting(30.0, help="seconds between checks of VM records against "
                                          "the VMs the agents report in heartbeats")
    mcp: McpConfig = field(default_factory=McpConfig)
    http: HttpLimits = field(default_factory=HttpLimits)  # [http]: deadlines and connection cap
    # TLS (see novacron.tls): client certificates are verified against tls_ca and required
    # from agents (their identity); the CLI may come without one.
    tls_cert: str = setting("", help="this coordinator's certificate (PEM, from `novacron pki issue`); "
                            "with tls_key and tls_ca the API is HTTPS")
    tls_key: str = setting("", help="the private key of tls_cert (PEM)")
    tls_ca: str = setting("", help="the fleet CA certificate (PEM) that agents' certificates must chain to")
    insecure: bool = setting(False, help="allow plain HTTP on a non-loopback address")
    grant_key_file: str = setting("", help="Ed25519 key that signs migration grants, made on first "
                                  "start; coordinators sharing one database must share it "
                                  "(empty: <data_dir>/grant-signing.key)")


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
    if cfg.migration_on_no_converge not in ("abort", "force", "postcopy"):
        raise Invalid("migration_on_no_converge", "must be abort, force or postcopy")
    check_secret(cfg, "admin_token", required=f"admin_token is required ({ENV_PREFIX}_ADMIN_TOKEN)")
    check_secret(cfg, "agent_token", required=f"agent_token is required ({ENV_PREFIX}_AGENT_TOKEN)")
    if cfg.admin_token == cfg.agent_token:
        raise Invalid("agent_token", "admin_token and agent_token must differ")
    if cfg.metrics_token and cfg.metrics_token in (cfg.admin_token, cfg.agent_token):
        raise Invalid("metrics_token", "metrics_token must differ from admin_token and agent_token")
    for key in ("heartbeat_interval_s", "agent_timeout_s", "poll_interval_s", "migration_timeout_s",
                "reconcile_interval_s"):
        if not getattr(cfg, key) > 0:  # 0 would spin the loops these pace (and NaN compares false)
            raise Invalid(key, "must be positive")
    if cfg.heartbeat_timeout_s <= cfg.heartbeat_interval_s:
        raise Invalid("heartbeat_timeout_s", "heartbeat_timeout_s must be larger than heartbeat_interval_s")
    if cfg.database_url and not cfg.database_url.startswith(("postgresql://", "postgres://")):
        raise Invalid("database_url", "must be a postgresql:// URL (empty: SQLite in data_dir)")
    if not 1 <= cfg.max_pending_heartbeats <= 1_000_000:
        raise Invalid("max_pending_heartbeats", "must be 1..1000000")
    for key in ("migration_limit_outbound", "migration_limit_inbound", "migration_limit_fleet"):
        if not 1 <= getattr(cfg, key) <= 10_000:
            raise Invalid(key, "must be 1..10000")
    if not 1 <= cfg.database_pool_size <= 1000:
        raise Invalid("database_pool_size", "must be 1..1000")
    if not cfg.lease_ttl_s >= 1:
        raise Invalid("lease_ttl_s", "must be at least 1 second")
    if cfg.max_body_bytes < 1024:
        raise Invalid("max_body_bytes", "must be at least 1024")
    from novacron.coordinator.migration_policies import Policies  # aiohttp: not for --help

    Policies.from_config(cfg.migration_policies, cfg.default_migration_policy)
    check_level(cfg.log_level)
    check_port(cfg, "port")
    check_mcp(cfg.mcp)
    check_http_limits(cfg.http)
    tls.check(cfg)
