"""``novacron migration list|show ID|set ID|cancel ID|policies``: migrations by id, and the policies.

The id is the one ``novacron migrate --no-wait`` prints and ``novacron migrations`` lists.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from novacron.cli.fleet import (
    AGENT_DEFAULTS,
    EXIT_CODES,
    POLICY_SOURCES,
    _dump,
    _migrations,
    _run,
    add_list_flags,
    applied_options,
    describe,
    exit_code,
    follow_migration,
    format_options,
    human_bytes,
    id_column,
    list_table,
    metrics_table,
    print_failure,
    print_table,
    progress_pct,
)
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    mig = sub.add_parser("migration", help="list, show, change or cancel migrations by id",
                         description="Migrations by the id 'novacron migrate --no-wait' prints.")
    cmds = mig.add_subparsers(dest="migration_command", metavar="ACTION", required=True)

    p = cmds.add_parser("list", help="migration history, newest first")
    add_list_flags(p)
    p.set_defaults(func=lambda a: _run(a, _migrations))

    p = cmds.add_parser("show", help="one migration: state, progress, error, metrics",
                        epilog="with --follow, " + EXIT_CODES)
    p.add_argument("id", metavar="ID", help="migration id (m-...)")
    p.add_argument("--follow", action="store_true",
                   help="if it is running, show its progress until it ends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _show))

    p = cmds.add_parser("set", help="change a running migration's bandwidth cap or downtime "
                        "budget (takes effect within a pre-copy round; audited)")
    p.add_argument("id", metavar="ID", help="migration id (m-...)")
    p.add_argument("--bandwidth-mbps", type=float, metavar="MB/S",
                   help="new cap on page data in MB/s, 0 = unlimited (default: unchanged; "
                   f"a new migration's is {AGENT_DEFAULTS.bandwidth_mbps:g})")
    p.add_argument("--downtime-ms", type=float, metavar="MS",
                   help="new pause budget of stop-and-copy in ms (default: unchanged; "
                   f"a new migration's is {AGENT_DEFAULTS.downtime_ms:g})")
    p.add_argument("--json", action="store_true", help="print the migration as JSON")
    p.set_defaults(func=lambda a: _run(a, _set))

    p = cmds.add_parser("policies", help="the coordinator's migration policies: options, the "
                        "labels that select each, the default")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _policies))

    p = cmds.add_parser("cancel", help="cancel a running or queued migration (the VM stays on "
                        "its source)")
    p.add_argument("id", metavar="ID", help="migration id (m-...)")
    p.add_argument("--json", action="store_true", help="print the migration as JSON")
    p.set_defaults(func=lambda a: _run(a, _cancel))


def postcopy_line(pc: dict[str, Any]) -> str:
    """The guest's pause, its faults on missing pages and the recoveries of a post-copy."""
    parts = []
    if pc.get("time_to_resume_ms") is not None:
        parts.append(f"ran at the destination after {pc['time_to_resume_ms']:.0f} ms")
    faults = (pc.get("blocktime") or {}).get("fault_ms") or {}
    if faults.get("count"):
        parts.append(f"{faults['count']} page faults waited p50 {faults['p50']:.1f} ms, "
                     f"p99 {faults['p99']:.1f} ms")
    if pc.get("recovering"):
        parts.append("channel lost: recovering")
    if pc.get("recoveries"):
        parts.append(f"recovered {pc['recoveries']}x (last in {pc.get('recover_ms', 0):.0f} ms)")
    return "; ".join(parts) or "started"


def summary_table(mig: dict[str, Any]) -> Table:
    table = Table(title=f"Migration {mig['id']}", title_justify="left", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("vm", mig["vm"])
    table.add_row("from", mig["source"])
    table.add_row("to", mig["target"])
    table.add_row("phase", mig["phase"])
    if mig.get("queue_reason"):
        table.add_row("waits for", mig["queue_reason"] + " (starts when a slot frees; "
                      f"'novacron migration cancel {mig['id']}' drops it)")
    if mig.get("budget_exceeded"):
        table.add_row("budget", "[bold yellow]exceeded[/bold yellow]: the pause outlasted downtime_ms")
    met = mig.get("metrics") or {}
    if met.get("progress_pct") is not None:
        table.add_row("progress", f"{progress_pct(mig):.1f}%  " + describe(mig).strip())
    if mig.get("round"):
        table.add_row("round", str(mig["round"]))
    postcopy = met.get("postcopy") or {}
    if postcopy.get("used"):
        table.add_row("post-copy", postcopy_line(postcopy))
    table.add_row("asked", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mig["created_at"])))
    if mig.get("started_at"):
        table.add_row("started", time.strftime("%Y-%m-%d %H:%M:%S",
                                               time.localtime(mig["started_at"])))
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
    followed = args.follow
    if args.json:
        _dump(mig)
        return exit_code(mig) if followed else 0
    print_failure(mig, console)  # the error first, then what it was and what it measured
    console.print(summary_table(mig))
    table = metrics_table(mig)
    if table is not None:
        console.print(table)
    return exit_code(mig) if followed else 0


async def _set(client: CoordinatorClient, args: argparse.Namespace) -> int:
    limits = {k: v for k, v in (("bandwidth_mbps", args.bandwidth_mbps),
                                ("downtime_ms", args.downtime_ms)) if v is not None}
    if not limits:
        print("novacron: error: give --bandwidth-mbps and/or --downtime-ms", file=sys.stderr)
        return 2
    mig = await client.change_migration(quote(args.id, safe=""), limits)
    if args.json:
        _dump(mig)
    else:
        opts = mig.get("options", {})
        cap = opts.get("bandwidth_mbps", AGENT_DEFAULTS.bandwidth_mbps)
        print(f"{mig['id']}: bandwidth {'unlimited' if not cap else f'{cap:g} MB/s'}, downtime budget "
              f"{opts.get('downtime_ms', AGENT_DEFAULTS.downtime_ms):g} ms "
              f"({human_bytes((mig.get('metrics') or {}).get('bytes_acked'))} sent so far)")
    return 0


async def _cancel(client: CoordinatorClient, args: argparse.Namespace) -> int:
    mig = await client.cancel_migration(quote(args.id, safe=""))
    if args.json:
        _dump(mig)
    else:
        print(f"cancelling {mig['id']}: {mig['vm']} stays on {mig['source']} "
              f"(see 'novacron migration show {mig['id']}')")
    return 0
