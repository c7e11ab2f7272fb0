"""``novacron-coordinator``: the fleet service."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from novacron.coordinator.config import DEFAULT_CONFIG, ENV_PREFIX, CoordinatorConfig, check_config
from novacron.daemon import Daemon


async def serve(cfg: CoordinatorConfig) -> None:
    from novacron.coordinator.service import serve  # not needed for --help or a config error

    await serve(cfg)


DAEMON = Daemon(
    prog="novacron-coordinator",
    description="NovaCron coordinator: fleet state, REST API, placement and the MCP bridge.",
    settings=CoordinatorConfig, env_prefix=ENV_PREFIX, default_config=DEFAULT_CONFIG,
    check=check_config, serve=serve, secrets=lambda cfg: (
        cfg.admin_token, cfg.agent_token, cfg.metrics_token, cfg.database_url, urlsplit(cfg.database_url).password or ""),
)
main = DAEMON.main

if __name__ == "__main__":
    sys.exit(main())
