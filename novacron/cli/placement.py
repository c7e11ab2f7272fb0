"""``novacron place`` (dry-run placement with its explanation) and ``novacron rebalance``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from novacron.cli import drain
from novacron.cli.fleet import _dump, _run, human_bytes, id_column
from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.coordinator.scheduler.rebalance import RebalanceOptions
from novacron.coordinator.scheduler.strategies import STRATEGIES

DEFAULTS = RebalanceOptions()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="where would a VM go, and why (dry run, changes nothing)")
    p.add_argument("--vcpus", type=int, required=True, metavar="N", help="virtual CPUs of the VM")
    p.add_argument("--memory-mb", type=int, required=True, metavar="MIB", help="guest RAM in MiB")
    p.add_argument("--name", help="VM name (for affinity rules of later VMs)")
    add_preference_flags(p)
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="how to weigh hosts: balanced (default), pack (fewest busy hosts), latency, "
                   "or a baseline: first-fit, best-fit, spread")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _place))

    p = sub.add_parser("rebalance", help="propose migrations that free hosts or relieve hot ones "
                       "(a plan; nothing moves unless --apply)",
                       description="Plan migrations that empty nearly idle hosts and relieve hot "
                       "ones. With --apply, show the plan, ask, then run exactly those moves "
                       "as a drain run (limits and queueing apply; 'novacron drain show ID').")
    p.add_argument("--max-migrations", type=int, metavar="N",
                   help=f"cap on moves in the plan (default: {DEFAULTS.max_migrations})")
    p.add_argument("--hot-threshold", type=float, metavar="FRACTION",
                   help=f"utilisation (0..1) above which a host is hot (default: {DEFAULTS.hot_threshold})")
    p.add_argument("--drain-threshold", type=float, metavar="FRACTION",
                   help=f"utilisation (0..1) below which a host is emptied (default: {DEFAULTS.drain_threshold})")
    p.add_argument("--bandwidth-mbps", type=float, metavar="MBIT/S",
                   help=f"link speed in Mbit/s used to estimate move time (default: {DEFAULTS.bandwidth_mbps:g})")
    p.add_argument("--apply", action="store_true",
                   help="start the planned migrations after showing the plan and asking "
                   "(default: plan only)")
    p.add_argument("--yes", action="store_true",
                   help="with --apply: do not ask for confirmation (default: ask)")
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="with --apply: moves at once, 1..64 (default: the coordinator's "
                   "migration_limit_outbound, 2 unless configured)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _rebalance))


PREFERENCES = ("priority", "region", "max_latency_ms", "affinity", "anti_affinity")


def add_preference_flags(p: argparse.ArgumentParser) -> None:
    """The scheduler's placement preferences, shared by ``place`` and ``vm create``."""
    p.add_argument("--priority", choices=["low", "normal", "high"],
                   help="placement priority (default: normal)")
    p.add_argument("--region", help="user region the VM should be close to")
    p.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="refuse hosts farther than this many ms from --region")
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
    console = Console(stderr=args.json)
    if args.json and not args.apply:
        _dump(plan)
        return 0
    if not plan["moves"]:
        console.print("nothing to move: no host to free and none too hot")
        if args.json:
            _dump(plan)
        return 0
    print_plan(plan, console, applying=args.apply)
    if not args.apply:
        return 0
    if not args.yes and not await confirm(console, len(plan["moves"])):
        console.print("not applied: nothing moved")
        return 1
    expect = [{k: m[k] for k in ("vm", "source", "target")} for m in plan["moves"]]
    applied = await client.request("POST", "/rebalance/plan", {
        **body, **given(args, "max_parallel"), "apply": True, "expect": expect})
    doc = await drain.follow(client, applied["drain"], console)
    if args.json:
        _dump({**applied, "drain": doc})
        return 0 if doc["state"] == "done" else 1
    return drain.report(doc, console)


async def confirm(console: Console, moves: int) -> bool:
    if not sys.stdin.isatty():
        raise ApiClientError(0, "--apply asks for confirmation on a terminal; "
                             "add --yes to apply without asking")
    answer = await asyncio.to_thread(console.input, f"Start these {moves} migrations? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def print_plan(plan: dict[str, Any], console: Console, *, applying: bool) -> None:
    title = ("Rebalancing plan" if applying else
             "Rebalancing plan (start it with: novacron rebalance --apply)")
    table = Table(title=title, title_justify="left")
    for col, key in (("vm", "vm"), ("from", "source"), ("to", "target")):
        id_column(table, col, [m[key] for m in plan["moves"]])
    for col in ("why", "memory", "est. time"):
        table.add_column(col)
    for m in plan["moves"]:
        table.add_row(m["vm"], m["source"], m["target"], m["reason"],
                      human_bytes(m["memory_mib"] << 20), f"{m['est_seconds']:.1f} s")
    console.print(table)
    console.print(f"frees {', '.join(plan['hosts_freed']) or 'no host'}; relieves "
                  f"{', '.join(plan['hot_relieved']) or 'no host'}; the freed hosts' cost_per_hour "
                  f"sums to {plan['hourly_saving']:.2f} per hour (in the unit of cost_per_hour) "
                  "once they are empty and you power them off"
                  + (" (capped: more moves were possible)" if plan["capped"] else ""))
