"""``novacron drain list|show ID``, and the progress view and report shared by
``novacron host drain`` and ``novacron rebalance --apply`` (both are drain runs)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any
from urllib.parse import quote

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from novacron.cli.fleet import _dump, _run, human_bytes, id_column, list_table
from novacron.coordinator.client import CoordinatorClient

POLL_S = 0.5
STATE_STYLE = {"pending": "dim", "queued": "yellow", "migrating": "cyan", "moved": "green",
               "failed": "bold red"}


def register(sub: argparse._SubParsersAction) -> None:
    drain = sub.add_parser("drain", help="drains ('novacron host drain') and applied rebalance "
                           "plans: list them, show one by id",
                           description="Runs started by 'novacron host drain NAME' and "
                           "'novacron rebalance --apply', by the id they print.")
    cmds = drain.add_subparsers(dest="drain_command", metavar="ACTION", required=True)
    p = cmds.add_parser("list", help="drains and applied rebalance plans, newest first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _list))
    p = cmds.add_parser("show", help="one drain: each VM's target, migration and outcome")
    p.add_argument("id", metavar="ID", help="drain id (d-...)")
    p.add_argument("--follow", action="store_true",
                   help="if it is running, show its progress until it ends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _show))


def title(doc: dict[str, Any]) -> str:
    what = f"drain of {doc['host']}" if doc["kind"] == "drain" else "rebalance"
    return f"{what} {doc['id']}"


def vm_table(doc: dict[str, Any], details: dict[str, str] | None = None, *,
             titled: bool = True) -> Table:
    """One row per VM; ``details``: live progress of the migrating ones, by VM."""
    vms = doc["vms"]
    table = list_table(f"{title(doc)}: {doc['state']}" if titled else "")
    id_column(table, "vm", [v["vm"] for v in vms])
    id_column(table, "to", [v["target"] or "-" for v in vms])
    id_column(table, "migration", [v["migration"] or "-" for v in vms])
    table.add_column("state", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for v in vms:
        detail = v["error"] or (details or {}).get(v["vm"], "")
        table.add_row(v["vm"], v["target"] or "-", v["migration"] or "-",
                      Text(v["state"], style=STATE_STYLE.get(v["state"], "")), detail)
    return table


def counts_line(doc: dict[str, Any], started: float) -> str:
    vms = doc["vms"]
    n = {s: sum(v["state"] == s for v in vms) for s in STATE_STYLE}
    parts = [f"{n['moved']}/{len(vms)} moved"] + [
        f"{n[s]} {word}" for s, word in (("migrating", "migrating"), ("queued", "queued"),
                                         ("pending", "waiting"), ("failed", "could not move"))
        if n[s]]
    return (f"{title(doc)} ({doc['state']}): {', '.join(parts)} · at most "
            f"{doc['max_parallel']} at once · {time.monotonic() - started:.0f} s")


async def _details(client: CoordinatorClient, doc: dict[str, Any]) -> dict[str, str]:
    out = {}
    for v in doc["vms"]:
        if v["state"] not in ("migrating", "queued") or not v["migration"]:
            continue
        mig = await client.migration(quote(v["migration"], safe=""))
        if mig["phase"] == "queued":
            out[v["vm"]] = f"waits: {mig.get('queue_reason') or 'a free slot'}"
            continue
        parts = [mig["phase"]]
        if mig.get("round"):
            parts.append(f"round {mig['round']}")
        sent = mig.get("metrics", {}).get("bytes_wire")
        if sent is not None:
            parts.append(f"{human_bytes(sent)} sent")
        out[v["vm"]] = " · ".join(parts)
    return out


async def follow(client: CoordinatorClient, doc: dict[str, Any], console: Console) -> dict[str, Any]:
    """One live view of the whole run (a line of counts, a row per VM) until it ends;
    without a terminal only the final view."""
    started = time.monotonic()

    def view(details: dict[str, str]) -> Group:
        return Group(Text(counts_line(doc, started)), vm_table(doc, details, titled=False))

    if not console.is_terminal:
        while doc["state"] == "running":
            await asyncio.sleep(POLL_S)
            doc = await client.request("GET", f"/drains/{quote(doc['id'], safe='')}")
        console.print(view({}))
        return doc
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            live.update(view(await _details(client, doc)), refresh=True)
            if doc["state"] != "running":
                return doc
            await asyncio.sleep(POLL_S)
            doc = await client.request("GET", f"/drains/{quote(doc['id'], safe='')}")


def report(doc: dict[str, Any], console: Console) -> int:
    """What moved and, first and plainly, what did not and why; 1 if anything stayed."""
    stuck = [v for v in doc["vms"] if v["state"] != "moved"]
    moved = len(doc["vms"]) - len(stuck)
    if doc["state"] == "running":
        console.print(f"{title(doc)} is still running: {moved}/{len(doc['vms'])} moved so far")
        return 0
    for v in stuck:
        console.print(f"[bold red]{v['vm']} did not move[/bold red]: {v['error'] or v['state']}",
                      highlight=False, soft_wrap=True)
    summary = f"{title(doc)}: {moved} of {len(doc['vms'])} VMs moved"
    if doc["kind"] == "drain":
        summary += (f"; {doc['host']} stays in maintenance ('novacron host maintenance "
                    f"{doc['host']} off' ends it)")
    console.print(summary, highlight=False, soft_wrap=True)
    return 1 if stuck else 0


async def _list(client: CoordinatorClient, args: argparse.Namespace) -> int:
    drains = (await client.request("GET", "/drains"))["drains"]
    if args.json:
        _dump(drains)
        return 0
    table = list_table("Drains")
    id_column(table, "id", [d["id"] for d in drains])
    for col in ("kind", "host", "state", "moved", "started"):
        table.add_column(col, overflow="fold")
    for d in drains:
        moved = sum(v["state"] == "moved" for v in d["vms"])
        table.add_row(d["id"], d["kind"], d["host"] or "-", d["state"], f"{moved}/{len(d['vms'])}",
                      time.strftime("%m-%d %H:%M:%S", time.localtime(d["created_at"])))
    Console().print(table if drains else "no drains")
    return 0


async def _show(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("GET", f"/drains/{quote(args.id, safe='')}")
    console = Console(stderr=args.json)
    if args.follow and doc["state"] == "running":
        doc = await follow(client, doc, console)
    elif not args.json:
        console.print(vm_table(doc))
    if args.json:
        _dump(doc)
        return 0 if doc["state"] != "failed" else 1
    return report(doc, console)
