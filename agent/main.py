"""``novacron-agent``: the daemon on every hypervisor host."""

from __future__ import annotations

import sys

from novacron import config, logs, tls
from novacron.agent.config import DEFAULT_CONFIG, ENV_PREFIX, AgentConfig
from novacron.daemon import Daemon
from novacron.grants import GrantError, GrantVerifier


def check_config(cfg: AgentConfig) -> None:
    if not cfg.token:
        raise config.Invalid("token", f"required (set it in the config file or ${ENV_PREFIX}_TOKEN)")
    logs.check_level(cfg.log_level)
    config.check_port(cfg, "port")
    config.check_port(cfg, "data_port")
    tls.check(cfg)
    tls.check_peer_url(cfg, "coordinator_url")  # the agent's token rides in its registration
    if cfg.grant_key:
        try:
            GrantVerifier(cfg.grant_key)
        except GrantError as exc:
            raise config.Invalid("grant_key", str(exc)) from None


async def serve(cfg: AgentConfig) -> None:
    from novacron.agent.daemon import serve  # not needed for --help or a config error

    await serve(cfg)


DAEMON = Daemon(
    prog="novacron-agent",
    description="NovaCron host agent: runs QEMU/KVM guests and live-migrates them.",
    settings=AgentConfig, env_prefix=ENV_PREFIX, default_config=DEFAULT_CONFIG,
    check=check_config, serve=serve,
    secrets=lambda cfg: (cfg.token, cfg.cluster_secret, cfg.coordinator_token),
)
main = DAEMON.main

if __name__ == "__main__":
    sys.exit(main())
