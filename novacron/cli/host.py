"""``novacron host maintenance NAME on|off``: take a host out of placement and back."""

from __future__ import annotations

import argparse
from urllib.parse import quote

from novacron.cli.fleet import _dump, _run
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    host = sub.add_parser("host", help="one host's lifecycle: maintenance on or off")
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
