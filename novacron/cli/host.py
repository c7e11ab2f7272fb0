"""``novacron host show NAME``, ``host maintenance NAME on|off`` (placement), ``host drain NAME``
(empty it) and ``host forget NAME`` (retire)."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table
from rich.text import Text

from novacron.cli import drain
from novacron.cli.fleet import _age, _dump, _run, host_state, human_bytes
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    host = sub.add_parser("host", help="one host: show it, maintenance on or off, drain it, "
                          "forget (retire) it")
    cmds = host.add_subparsers(dest="host_command", metavar="ACTION", required=True)

    p = cmds.add_parser("show", help="one host: state (up, down, maintenance, draining), "
                        "capacity, networks, VMs")
    p.add_argument("name", metavar="NAME", help="host name")
    p.add_argument("--json", action="store_true", help="print the host as JSON")
    p.set_defaults(func=lambda a: _run(a, _show))

    p = cmds.add_parser("maintenance", help="no VM is placed on or migrated to a host in "
                        "maintenance (a manual 'migrate --force' still can); its VMs keep running",
                        description="Turn a host's maintenance on or off. In maintenance the "
                        "scheduler places no new VM on it and 'novacron migrate' to it needs "
                        "--force; VMs already there keep running.")
    p.add_argument("name", metavar="NAME", help="host name")
    p.add_argument("state", choices=["on", "off"], help="on: enter maintenance; off: leave it")
    p.add_argument("--json", action="store_true", help="print the host as JSON")
    p.set_defaults(func=lambda a: _run(a, _maintenance))

    p = cmds.add_parser("drain", help="empty a host: maintenance on, then live-migrate every VM "
                        "off it through the scheduler; reports what could not move and why",
                        description="Put NAME in maintenance, then live-migrate each of its VMs "
                        "to a host the scheduler chooses (never one in maintenance, down, or "
                        "lacking the VM's networks), at most --max-parallel at a time and within "
                        "the coordinator's migration limits (more are queued). A VM that cannot "
                        "move stays running on NAME and is reported. Exits 1 if any VM stayed. "
                        "The host stays in maintenance afterwards.")
    p.add_argument("name", metavar="NAME", help="host to drain")
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="VMs moving at once, 1..64 (default: the coordinator's "
                   "migration_limit_outbound, 2 unless configured)")
    p.add_argument("--no-wait", action="store_true",
                   help="start it, print its id (for 'novacron drain show ID') and return")
    p.add_argument("--json", action="store_true", help="print the final drain document as JSON")
    p.set_defaults(func=lambda a: _run(a, _drain))

    forget = cmds.add_parser("forget", help="retire a host: drop its record and release its "
                             "name for a new identity (a reinstalled host)")
    forget.add_argument("name", metavar="HOST", help="host name")
    forget.add_argument("--keep-identity", action="store_true",
                        help="drop the record only; the name stays bound to its identity")
    forget.set_defaults(func=lambda a: _run(a, _forget))


async def _show(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("GET", f"/hosts/{quote(args.name, safe='')}")
    if args.json:
        _dump(doc)
        return 0
    # the coordinator's records (the agent's last report may lag behind a move)
    vms = sorted(v["name"] for v in await client.vms() if v["host"] == doc["name"])
    console = Console()
    table = Table(title=f"Host {doc['name']}", title_justify="left", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("state", Text.from_markup(host_state(doc))),
        ("drain", doc.get("drain") or "-"),
        ("agent", doc["url"]),
        ("cpus", str(doc["cpus"])),
        ("memory", f"{human_bytes(doc['memory_bytes'])} "
                   f"({human_bytes(doc['memory_available_bytes'])} free)"),
        ("networks", ", ".join(doc.get("networks") or []) or "-"),
        ("seen", _age(doc.get("last_heartbeat", 0))),
        ("vms", ", ".join(vms) or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    return 0


async def _drain(client: CoordinatorClient, args: argparse.Namespace) -> int:
    body = {} if args.max_parallel is None else {"max_parallel": args.max_parallel}
    doc = await client.request("POST", f"/hosts/{quote(args.name, safe='')}/drain", body)
    if args.no_wait:
        _dump(doc) if args.json else print(doc["id"])
        return 0
    console = Console(stderr=args.json)
    if not doc["vms"]:
        console.print(f"{args.name} runs no VMs: nothing to move; it is in maintenance")
    doc = await drain.follow(client, doc, console)
    if args.json:
        _dump(doc)
        return 0 if doc["state"] == "done" else 1
    return drain.report(doc, console)


async def _maintenance(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("PUT", f"/hosts/{quote(args.name, safe='')}/maintenance",
                               {"maintenance": args.state == "on"})
    if args.json:
        _dump(doc)
    elif doc["maintenance"]:
        vms = doc.get("vms") or []
        print(f"{doc['name']}: in maintenance; no new VMs go there"
              + (f" ({len(vms)} VMs still on it)" if vms else ""))
    else:
        print(f"{doc['name']}: out of maintenance; takes VMs again")
    return 0


async def _forget(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.forget_host(args.name, retire=not args.keep_identity)
    print(f"host {doc['deleted']} " + ("retired" if doc.get("retired") else "forgotten"))
    return 0
