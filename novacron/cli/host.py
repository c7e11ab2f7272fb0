"""``novacron host maintenance NAME on|off`` (placement) and ``novacron host forget NAME`` (retire)."""

from __future__ import annotations

import argparse
from urllib.parse import quote

from novacron.cli.fleet import _dump, _run
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    host = sub.add_parser("host", help="one host's lifecycle: maintenance on or off, forget (retire)")
    cmds = host.add_subparsers(dest="host_command", metavar="ACTION", required=True)

    p = cmds.add_parser("maintenance", help="no VM is placed on or migrated to a host in "
                        "maintenance (a manual 'migrate --force' still can); its VMs keep running",
                        description="Turn a host's maintenance on or off. In maintenance the "
                        "scheduler places no new VM on it and 'novacron migrate' to it needs "
                        "--force; VMs already there keep running.")
    p.add_argument("name", metavar="NAME", help="host name")
    p.add_argument("state", choices=["on", "off"], help="on: enter maintenance; off: leave it")
    p.add_argument("--json", action="store_true", help="print the host as JSON")
    p.set_defaults(func=lambda a: _run(a, _maintenance))

    forget = cmds.add_parser("forget", help="retire a host: drop its record and release its "
                             "name for a new identity (a reinstalled host)")
    forget.add_argument("name", metavar="HOST", help="host name")
    forget.add_argument("--keep-identity", action="store_true",
                        help="drop the record only; the name stays bound to its identity")
    forget.set_defaults(func=lambda a: _run(a, _forget))


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
