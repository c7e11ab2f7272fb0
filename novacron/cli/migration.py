"""``novacron migration list|show ID|cancel ID|policies``: migrations by id, and the policies.

The id is the one ``novacron migrate --no-wait`` prints and ``novacron migrations`` lists.
"""

from __future__ import annotations

import argparse
import time
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from novacron.cli.fleet import (
    POLICY_SOURCES,
    _dump,
    _migrations,
    _run,
    add_list_flags,
    applied_options,
    follow_migration,
    format_options,
    id_column,
    list_table,
    metrics_table,
    print_failure,
    print_table,
)
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    mig = sub.add_parser("migration", help="list, show or cancel migrations by id",
                         description="Migrations by the id 'novacron migrate --no-wait' prints.")
    cmds = mig.add_subparsers(dest="migration_command", metavar="ACTION", required=True)

    p = cmds.add_parser("list", help="migration history, newest first")
    add_list_flags(p)
    p.set_defaults(func=lambda a: _run(a, _migrations))

    p = cmds.add_parser("show", help="one migration: state, error, metrics")
    p.add_argument("id", metavar="ID", help="migration id (m-...)")
    p.add_argument("--follow", action="store_true",
                   help="if it is running, show its progress until it ends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _show))

    p = cmds.add_parser("policies", help="the coordinator's migration policies: options, the "
                        "labels that select each, the default")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _policies))

    p = cmds.add_parser("cancel", help="cancel a running migration (the VM stays on its source)")
    p.add_argument("id", metavar="ID", help="migration id (m-...)")
    p.add_argument("--json", action="store_true", help="print the migration as JSON")
    p.set_defaults(func=lambda a: _run(a, _cancel))


def summary_table(mig: dict[str, Any]) -> Table:
    table = Table(title=f"Migration {mig['id']}", title_justify="left", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("vm", mig["vm"])
    table.add_row("from", mig["source"])
    table.add_row("to", mig["target"])
    table.add_row("phase", mig["phase"])
    if mig.get("round"):
        table.add_row("round", str(mig["round"]))
    table.add_row("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mig["created_at"])))
    name = mig.get("policy")
    table.add_row("policy", f"{name} ({POLICY_SOURCES.get(mig.get('policy_source') or '', '?')})"
                  if name else "none")
    table.add_row("options", applied_options(mig))
    return table


async def _policies(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("GET", "/migration-policies")
    if args.json:
        _dump(doc)
        return 0
    policies = doc["policies"]
    if not policies:
        print("no migration policies configured (migrations use the agent's defaults)")
        return 0
    table = list_table("Migration policies")
    id_column(table, "name", [p["name"] for p in policies])
    table.add_column("selects VMs labelled", overflow="fold")
    table.add_column("options", overflow="fold")
    table.add_column("description", overflow="fold")
    for p in policies:
        table.add_row(p["name"], ", ".join(f"{k}={v}" for k, v in sorted(p["selector"].items()))
                      or "-", format_options(p["options"]) or "-", p.get("description") or "-")
    print_table(table)
    Console().print(f"default: {doc['default'] or 'none (the agent defaults)'}", highlight=False)
    return 0


async def _show(client: CoordinatorClient, args: argparse.Namespace) -> int:
    mig = await client.migration(quote(args.id, safe=""))
    console = Console(stderr=args.json)
    if args.follow and mig["phase"] not in ("completed", "failed", "cancelled"):
        if args.json:
            async for event in client.migration_events(mig["id"]):
                mig = event
        else:
            mig = await follow_migration(client, mig, console)
    if args.json:
        _dump(mig)
        return 0
    print_failure(mig, console)  # the error first, then what it was and what it measured
    console.print(summary_table(mig))
    table = metrics_table(mig)
    if table is not None:
        console.print(table)
    return 0


async def _cancel(client: CoordinatorClient, args: argparse.Namespace) -> int:
    mig = await client.cancel_migration(quote(args.id, safe=""))
    if args.json:
        _dump(mig)
    else:
        print(f"cancelling {mig['id']}: {mig['vm']} stays on {mig['source']} "
              f"(see 'novacron migration show {mig['id']}')")
    return 0
