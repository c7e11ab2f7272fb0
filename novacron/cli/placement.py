"""``novacron place`` (dry-run placement with its explanation) and ``novacron rebalance``."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from novacron.cli.fleet import _dump, _run, human_bytes
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="where would a VM go, and why (dry run, changes nothing)")
    p.add_argument("--vcpus", type=int, required=True)
    p.add_argument("--memory-mb", type=int, required=True)
    p.add_argument("--name", help="VM name (for affinity rules of later VMs)")
    add_preference_flags(p)
    p.add_argument("--strategy", help="balanced (default), cost, performance, latency ...")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _place))

    p = sub.add_parser("rebalance", help="propose migrations that free hosts or relieve hot ones "
                       "(a plan; nothing moves)")
    p.add_argument("--max-migrations", type=int, help="cap on moves in the plan (default 10)")
    p.add_argument("--hot-threshold", type=float, help="utilisation above which a host is hot")
    p.add_argument("--drain-threshold", type=float, help="utilisation below which a host is drained")
    p.add_argument("--bandwidth-mbps", type=float, help="link speed used to estimate move time")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _rebalance))


PREFERENCES = ("priority", "region", "max_latency_ms", "affinity", "anti_affinity")


def add_preference_flags(p: argparse.ArgumentParser) -> None:
    """The scheduler's placement preferences, shared by ``place`` and ``vm create``."""
    p.add_argument("--priority", choices=["low", "normal", "high"])
    p.add_argument("--region", help="user region the VM should be close to")
    p.add_argument("--max-latency-ms", type=float, help="refuse hosts farther than this from --region")
    p.add_argument("--affinity", action="append", metavar="VM", help="place beside this VM")
    p.add_argument("--anti-affinity", action="append", metavar="VM", help="keep away from this VM")


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


async def _place(client: CoordinatorClient, args: argparse.Namespace) -> int:
    vm = given(args, "name", "vcpus", "memory_mb", *PREFERENCES)
    body: dict[str, Any] = {"vm": vm, **given(args, "strategy")}
    doc = await client.request("POST", "/placements", body)
    if args.json:
        _dump(doc)
        return 0 if doc["placed"] else 1
    expl = doc["explanation"]
    console = Console()
    where = f"[bold green]{doc['host']}[/bold green]" if doc["placed"] else "[bold red]nowhere[/bold red]"
    console.print(f"{where}: {expl['why']}")
    console.print(f"{expl['hosts_considered']} hosts considered, {expl['feasible']} feasible, "
                  f"Pareto front of {expl.get('pareto_front_size', 0)}")
    if expl["rejected"]:
        table = Table(title="Rejected", title_justify="left")
        table.add_column("reason")
        table.add_column("hosts", justify="right")
        for reason, info in expl["rejected"].items():
            table.add_row(info.get("why", reason) if isinstance(info, dict) else reason,
                          str(info.get("hosts", info) if isinstance(info, dict) else info))
        console.print(table)
    return 0 if doc["placed"] else 1


async def _rebalance(client: CoordinatorClient, args: argparse.Namespace) -> int:
    body = given(args, "max_migrations", "hot_threshold", "drain_threshold", "bandwidth_mbps")
    plan = await client.request("POST", "/rebalance/plan", body)
    if args.json:
        _dump(plan)
        return 0
    console = Console()
    if not plan["moves"]:
        console.print("nothing to move: no host to free and none too hot")
        return 0
    table = Table(title="Rebalancing plan (run each with: novacron migrate VM --to HOST)",
                  title_justify="left")
    for col in ("vm", "from", "to", "why", "memory", "est. time"):
        table.add_column(col)
    for m in plan["moves"]:
        table.add_row(m["vm"], m["source"], m["target"], m["reason"],
                      human_bytes(m["memory_mib"] << 20), f"{m['est_seconds']:.1f} s")
    console.print(table)
    console.print(f"frees {', '.join(plan['hosts_freed']) or 'no host'}; relieves "
                  f"{', '.join(plan['hot_relieved']) or 'no host'}; saves "
                  f"{plan['hourly_saving']:.2f}/h" + (" (capped)" if plan["capped"] else ""))
    return 0
