"""``novacron mcp``: NovaCron's MCP server on stdin/stdout, for MCP hosts that start it.

Configure the host with the command ``novacron mcp`` (plus ``--server`` and
``--token``, or $NOVACRON_SERVER / $NOVACRON_TOKEN). The tools run in the
coordinator; this process carries the messages.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from novacron import tls


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mcp",
        help="serve NovaCron's MCP tools over stdio (for Claude Desktop, IDEs, agents)",
        description="Speak MCP (newline-delimited JSON-RPC) on stdin/stdout; every message is "
        "served by the coordinator's /mcp endpoint with the CLI's server and token.",
    )
    p.add_argument("--max-line", type=int, default=1 << 20, metavar="BYTES",
                   help="longest accepted input line (default 1 MiB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from novacron.coordinator.mcp.stdio_server import HttpForwarder, serve_stdio

    settings = args.settings
    if not settings.token:
        print("novacron mcp: no API token (use --token or $NOVACRON_TOKEN)", file=sys.stderr)
        return 2
    if args.max_line < 1024:
        print("novacron mcp: --max-line must be at least 1024", file=sys.stderr)
        return 2

    async def main() -> None:
        async with HttpForwarder(settings.server, settings.token,
                                 ssl=tls.verify_context(settings.ca)) as forwarder:
            await serve_stdio(forwarder, max_line=args.max_line)

    asyncio.run(main())
    return 0
