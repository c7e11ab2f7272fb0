"""``novacron-coordinator``: the fleet service."""

from __future__ import annotations

import argparse
import asyncio
import sys

from novacron import config, logs
from novacron.coordinator.config import DEFAULT_CONFIG, ENV_PREFIX, CoordinatorConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="novacron-coordinator",
        description="NovaCron coordinator: fleet state, REST API, placement and the MCP bridge.",
        epilog=f"Config file: --config, ${ENV_PREFIX}_CONFIG or {DEFAULT_CONFIG}. "
        f"Every setting can also be given as ${ENV_PREFIX}_<KEY>.",
    )
    parser.add_argument("--config", help="TOML config file")
    config.add_flags(parser, CoordinatorConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config.load_or_exit(
        CoordinatorConfig, args, prog="novacron-coordinator", env_prefix=ENV_PREFIX,
        default_path=DEFAULT_CONFIG,
    )
    logs.setup(cfg.log_level)
    logs.register_secret(cfg.admin_token)
    logs.register_secret(cfg.agent_token)
    from novacron.coordinator.service import ConfigProblem, check_config, serve

    try:
        check_config(cfg)
    except ConfigProblem as exc:
        raise SystemExit(f"novacron-coordinator: config error: {exc}") from None
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
