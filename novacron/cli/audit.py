"""``novacron audit``: the audit log (who changed what, from where, with what result)."""

from __future__ import annotations

import argparse
from urllib.parse import urlencode

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from novacron.audit import MAX_QUERY_LIMIT
from novacron.cli.fleet import _dump, _run
from novacron.coordinator.client import CoordinatorClient

RESULT_STYLE = {"ok": "green", "refused": "red", "error": "yellow"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="the audit log, newest first",
                       description="State-changing requests and refused authentications recorded "
                       "by the coordinator (or, with --host, by that host's agent), newest first.")
    p.add_argument("--since", metavar="ISO", help="from this time on (ISO 8601, e.g. 2026-11-30T12:00Z)")
    p.add_argument("--until", metavar="ISO", help="up to this time (ISO 8601)")
    p.add_argument("--actor", help="only this credential (admin, agent, ...)")
    p.add_argument("--action", help="only actions containing this (e.g. migrat, DELETE)")
    p.add_argument("--target", help="only this target (a VM or host name)")
    p.add_argument("--result", choices=("ok", "refused", "error"), help="only entries with this result")
    p.add_argument("--host", help="read this host agent's audit log instead")
    p.add_argument("--limit", type=int, default=100, help=f"at most N entries (1..{MAX_QUERY_LIMIT}, default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _audit))


async def _audit(client: CoordinatorClient, args: argparse.Namespace) -> int:
    query = {k: v for k in ("since", "until", "actor", "action", "target", "result", "host", "limit")
             if (v := getattr(args, k)) is not None}
    entries = (await client.request("GET", "/audit?" + urlencode(query)))["entries"]
    if args.json:
        _dump(entries)
        return 0
    table = Table(title="Audit log" + (f" of {args.host}" if args.host else ""), title_justify="left")
    for col in ("time", "actor", "remote", "action", "target", "result"):
        table.add_column(col)
    for e in entries:
        result = str(e.get("result", "-"))
        shown = f"{result} {e['status']}" if "status" in e else result
        if e.get("suppressed"):
            shown += f" (+{e['suppressed']} suppressed)"
        style = RESULT_STYLE.get(result, "")
        table.add_row(*(escape(str(e.get(k, "-"))) for k in ("time", "actor", "remote", "action", "target")),
                      f"[{style}]{escape(shown)}[/{style}]" if style else escape(shown))
    Console().print(table if entries else "no audit entries")
    return 0
