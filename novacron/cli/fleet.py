"""``novacron hosts``, ``vms``, ``migrations`` and ``migrate VM --to HOST``: the fleet API."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from novacron import tls
from novacron.coordinator.client import ApiClientError, CoordinatorClient

# Where each phase sits on the progress bar (pre-copy fills 10-75 % by round).
PHASE_PCT = {"pending": 0, "prepare": 5, "precopy": 10, "stopcopy": 80, "postcopy": 85,
             "commit": 95, "completed": 100}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hosts", help="list hosts and their agents")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _hosts))

    p = sub.add_parser("vms", help="list VMs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _vms))

    p = sub.add_parser("migrations", help="migration history, newest first")
    p.add_argument("--vm", help="only this VM's migrations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _migrations))

    p = sub.add_parser("migrate", help="live-migrate a VM to another host, showing progress",
                       description="Live-migrate VM to HOST through the coordinator. Shows a "
                       "progress bar, then the metrics. Ctrl-C cancels the migration.")
    p.add_argument("vm", metavar="VM")
    p.add_argument("--to", required=True, metavar="HOST", dest="target")
    p.add_argument("--bandwidth-mbps", type=float, help="cap on page data in MB/s (0 = unlimited)")
    p.add_argument("--downtime-ms", type=float, help="pause budget of stop-and-copy in ms")
    p.add_argument("--max-rounds", type=int, help="pre-copy round limit")
    p.add_argument("--no-wait", action="store_true", help="start it and return at once")
    p.add_argument("--json", action="store_true", help="print the final migration as JSON")
    p.set_defaults(func=lambda a: _run(a, _migrate))

    p = sub.add_parser("host", help="manage one host's record and identity")
    host_sub = p.add_subparsers(dest="host_command", metavar="ACTION", required=True)
    forget = host_sub.add_parser("forget", help="retire a host: drop its record and release its "
                                 "name for a new identity (a reinstalled host)")
    forget.add_argument("name", metavar="HOST")
    forget.add_argument("--keep-identity", action="store_true",
                        help="drop the record only; the name stays bound to its identity")
    forget.set_defaults(func=lambda a: _run(a, _forget))


def _run(args: argparse.Namespace, fn: Callable[[CoordinatorClient, argparse.Namespace],
                                                Awaitable[int]]) -> int:
    settings = args.settings

    async def go() -> int:
        async with CoordinatorClient(settings.server, settings.token,
                                     ssl=tls.verify_context(settings.ca)) as client:
            return await fn(client, args)

    try:
        return asyncio.run(go())
    except ApiClientError as exc:
        print(f"novacron: error: {exc}", file=sys.stderr)
        return 1


async def _forget(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.forget_host(args.name, retire=not args.keep_identity)
    print(f"host {doc['deleted']} " + ("retired" if doc.get("retired") else "forgotten"))
    return 0


def _dump(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _age(ts: float) -> str:
    if not ts:
        return "-"
    return f"{max(0.0, time.time() - ts):.0f}s ago"


async def _hosts(client: CoordinatorClient, args: argparse.Namespace) -> int:
    hosts = await client.hosts()
    if args.json:
        _dump(hosts)
        return 0
    table = Table(title="Hosts", title_justify="left")
    for col in ("name", "state", "agent", "cpus", "memory", "free", "vms", "heartbeat"):
        table.add_column(col, justify="right" if col in ("cpus", "memory", "free") else "left")
    for h in hosts:
        state = "[green]up[/green]" if h["state"] == "up" else "[red]down[/red]"
        table.add_row(h["name"], state, h["url"], str(h["cpus"]), human_bytes(h["memory_bytes"]),
                      human_bytes(h["memory_available_bytes"]), ", ".join(h.get("vms", [])) or "-",
                      _age(h.get("last_heartbeat", 0)))
    Console().print(table if hosts else "no hosts registered")
    return 0


async def _vms(client: CoordinatorClient, args: argparse.Namespace) -> int:
    vms = (await client.request("GET", "/vms?refresh=true"))["vms"]  # live states
    if args.json:
        _dump(vms)
        return 0
    table = Table(title="VMs", title_justify="left")
    for col in ("name", "host", "state", "vcpus", "memory"):
        table.add_column(col)
    for v in vms:
        table.add_row(v["name"], v["host"], v["state"], str(v["spec"].get("vcpus", "-")),
                      f"{v['spec'].get('memory_mb', '-')} MiB")
    Console().print(table if vms else "no VMs")
    return 0


async def _migrations(client: CoordinatorClient, args: argparse.Namespace) -> int:
    path = "/migrations" + (f"?vm={args.vm}" if args.vm else "")
    migs = (await client.request("GET", path))["migrations"]
    if args.json:
        _dump(migs)
        return 0
    table = Table(title="Migrations", title_justify="left")
    for col in ("id", "vm", "from", "to", "phase", "downtime", "total", "started"):
        table.add_column(col)
    for m in migs:
        met = m.get("metrics", {})
        table.add_row(m["id"], m["vm"], m["source"], m["target"], m["phase"],
                      _fmt_metric("downtime_ms", met.get("downtime_ms")),
                      _fmt_metric("total_s", met.get("total_s")),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"])))
    Console().print(table if migs else "no migrations")
    return 0


def _fmt_metric(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.endswith("bytes_s"):
            return human_bytes(value) + "/s"
        if key.endswith("pages_s"):
            return f"{value:,.0f} pages/s"
        if key.startswith("bytes") or key.endswith("_bytes"):
            return human_bytes(value)
        if key.endswith("_ms"):
            return f"{value:.1f} ms"
        if key.endswith("_s") or key.startswith("seconds"):
            return f"{value:.2f} s"
        if key.endswith("ratio"):
            return f"{value:.2f}x"
        if isinstance(value, float):
            return f"{value:,.2f}"
        return f"{value:,}"
    return json.dumps(value) if not isinstance(value, str) else value


def metrics_table(mig: dict[str, Any]) -> Table:
    table = Table(title=f"Migration {mig['id']}: {mig['vm']} {mig['source']} -> {mig['target']}"
                  f" ({mig['phase']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("rounds", str(mig.get("round", 0)))
    for key, value in sorted(mig.get("metrics", {}).items()):
        if not isinstance(value, (dict, list)):  # nested detail is in --json
            table.add_row(key, _fmt_metric(key, value))
    if mig.get("error"):
        table.add_row("error", str(mig["error"]))
    return table


def progress_pct(mig: dict[str, Any], max_rounds: int) -> float:
    phase = mig.get("phase", "pending")
    pct = float(PHASE_PCT.get(phase, 0))
    if phase == "precopy":
        pct += 65.0 * min(1.0, mig.get("round", 0) / max(1, max_rounds))
    return pct


def describe(mig: dict[str, Any]) -> str:
    met = mig.get("metrics", {})
    parts = [f"{mig.get('phase', '?'):>9}"]
    if mig.get("round"):
        parts.append(f"round {mig['round']}")
    if met.get("bytes_wire") is not None:
        parts.append(f"{human_bytes(met['bytes_wire'])} sent")
    return " · ".join(parts)


async def follow_migration(client: CoordinatorClient, mig: dict[str, Any], console: Console,
                           max_rounds: int = 30) -> dict[str, Any]:
    """Show a live progress bar until the migration ends; return its final state."""
    with Progress(TextColumn(f"[bold]{mig['vm']}[/bold] {mig['source']} → {mig['target']}"),
                  BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(describe(mig), total=100)
        async for event in client.migration_events(mig["id"]):
            mig = event
            progress.update(task, completed=progress_pct(mig, max_rounds),
                            description=describe(mig))
    return mig


async def _migrate(client: CoordinatorClient, args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("bandwidth_mbps", args.bandwidth_mbps),
                                 ("downtime_ms", args.downtime_ms),
                                 ("max_rounds", args.max_rounds)) if v is not None}
    mig = await client.migrate(args.vm, args.target, options)
    if args.no_wait:
        _dump(mig) if args.json else print(mig["id"])
        return 0
    console = Console(stderr=args.json)
    try:
        if args.json:
            async for event in client.migration_events(mig["id"]):
                mig = event
        else:
            mig = await follow_migration(client, mig, console, args.max_rounds or 30)
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted: cancelling the migration[/yellow]")
        try:
            await client.cancel_migration(mig["id"])
        except ApiClientError as exc:
            console.print(f"cancel refused: {exc}")
        raise
    if args.json:
        _dump(mig)
    else:
        console.print(metrics_table(mig))
    return 0 if mig["phase"] == "completed" else 1
