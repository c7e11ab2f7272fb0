"""``novacron-agent``: the daemon on every hypervisor host."""

from __future__ import annotations

import argparse
import asyncio
import sys

from novacron import config, logs
from novacron.agent.config import DEFAULT_CONFIG, ENV_PREFIX, AgentConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="novacron-agent",
        description="NovaCron host agent: runs QEMU/KVM guests and live-migrates them.",
        epilog=f"Config file: --config, ${ENV_PREFIX}_CONFIG or {DEFAULT_CONFIG}. "
        f"Every setting can also be given as ${ENV_PREFIX}_<KEY>.",
    )
    parser.add_argument("--config", help="TOML config file")
    config.add_flags(parser, AgentConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config.load_or_exit(
        AgentConfig, args, prog="novacron-agent", env_prefix=ENV_PREFIX, default_path=DEFAULT_CONFIG
    )
    if not cfg.token:
        raise SystemExit(
            "novacron-agent: config error: settings: key 'token': required "
            f"(set it in the config file or ${ENV_PREFIX}_TOKEN)"
        )
    logs.setup(cfg.log_level)
    logs.register_secret(cfg.token)
    logs.register_secret(cfg.cluster_secret)
    logs.register_secret(cfg.coordinator_token)
    from novacron.agent.daemon import serve

    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
