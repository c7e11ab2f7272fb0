"""Entry point of the ``novacron`` CLI.

Each command group lives in its own module under ``novacron.cli`` and exposes
``register(subparsers)``; the handler it sets as ``func`` returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from novacron import __version__, config, logs

# Command-group modules, in the order their commands appear in --help.
COMMAND_MODULES = [
    "novacron.cli.bench",
    "novacron.cli.fleet",
    "novacron.cli.migration",
    "novacron.cli.host",
    "novacron.cli.drain",
    "novacron.cli.vm",
    "novacron.cli.swarm",
    "novacron.cli.placement",
    "novacron.cli.demo",
    "novacron.cli.mcp",
    "novacron.cli.task",
    "novacron.cli.audit",
    "novacron.cli.pki",
    "novacron.cli.completion",
]


@dataclass
class CliConfig:
    """Where the CLI finds the coordinator (file: ~/.config/novacron/cli.toml)."""

    server: str = "http://127.0.0.1:7800"
    token: str = ""
    ca: str = ""  # CA file that signed the coordinator's certificate (empty: the system's CAs)
    log_level: str = "warning"


ENV_PREFIX = "NOVACRON"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="novacron",
        description="Drive a NovaCron fleet: hosts, VMs, live migration, placement, tasks.",
    )
    parser.add_argument("--version", action="version", version=f"novacron {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="TOML config file (default: ~/.config/novacron/cli.toml if it exists; "
                        "$NOVACRON_CONFIG)")
    parser.add_argument("--server", dest="cfg__server", metavar="URL",
                        help=f"coordinator URL (default: {CliConfig.server}; $NOVACRON_SERVER)")
    parser.add_argument("--token", dest="cfg__token", metavar="TOKEN",
                        help="API token (default: none; $NOVACRON_TOKEN)")
    parser.add_argument("--ca", dest="cfg__ca", metavar="PATH",
                        help="CA file that verifies an https coordinator "
                        "(default: the system's CAs; $NOVACRON_CA)")
    parser.add_argument("--log-level", dest="cfg__log_level", metavar="LEVEL",
                        help=f"debug, info, warning or error (default: {CliConfig.log_level}; "
                        "$NOVACRON_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def flag_names(parser: argparse.ArgumentParser, func: object) -> dict[str, str]:
    """dest -> how the user wrote it (``--memory-mb``, ``NAME``) in the subcommand running ``func``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found = flag_names(sub, func)
                if found:
                    return found
    if parser._defaults.get("func") is not func:
        return {}
    return {a.dest: (next((o for o in a.option_strings if o.startswith("--")), "")
                     or str(a.metavar or a.dest.upper()))
            for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


def load_config(args: argparse.Namespace) -> CliConfig:
    from pathlib import Path

    default = Path.home() / ".config" / "novacron" / "cli.toml"
    return config.load_or_exit(
        CliConfig, args, prog="novacron", env_prefix=ENV_PREFIX, default_path=default,
        check=lambda cfg: logs.check_level(cfg.log_level),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.settings = load_config(args)
    args.flag_names = flag_names(parser, args.func)  # for errors that name an API field
    logs.setup(args.settings.log_level, fmt="text")
    logs.register_secret(args.settings.token)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
