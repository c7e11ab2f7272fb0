"""``novacron hosts``, ``vms``, ``migrations`` and ``migrate VM --to HOST``: the fleet API."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from novacron import tls
from novacron.agent.migration.options import MigrationOptions
from novacron.coordinator.client import ApiClientError, CoordinatorClient

AGENT_DEFAULTS = MigrationOptions()  # what the source agent uses for an option not given

# Exit codes of 'novacron migrate' (and 'migration show --follow'): 0 completed within
# its downtime budget; 1 failed or cancelled (the VM stays on its source); 3 completed
# but the pause outlasted the budget (on_no_converge=force, or a slow hand-over).
EXIT_BUDGET_EXCEEDED = 3
EXIT_CODES = ("exit codes: 0 completed within the downtime budget; 1 failed or cancelled "
              "(the VM stays on its source); 3 completed, but the pause exceeded the budget")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hosts", help="list hosts and their agents")
    p.add_argument("--wide", action="store_true", help="also show each host's agent URL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _hosts))

    p = sub.add_parser("vms", help="list VMs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _vms))

    p = sub.add_parser("migrations", help="migration history, newest first "
                       "(same as 'migration list')")
    add_list_flags(p)
    p.set_defaults(func=lambda a: _run(a, _migrations))

    p = sub.add_parser("migrate", help="live-migrate a VM to another host, showing progress",
                       description="Live-migrate VM to HOST through the coordinator. Shows a "
                       "progress bar (data acknowledged by the destination, remaining, rate, dirty "
                       "rate, ETA), then the metrics. Ctrl-C cancels the migration. "
                       "'novacron migration set ID' changes bandwidth and downtime while it runs.",
                       epilog=EXIT_CODES)
    p.add_argument("vm", metavar="VM", help="name of the VM to move")
    p.add_argument("--to", required=True, metavar="HOST", dest="target", help="target host name")
    p.add_argument("--policy", metavar="NAME",
                   help="migration policy ('novacron migration policies'); the flags below override "
                   "single options of it (default: the VM's policy, else the one its labels select, "
                   "else the coordinator's default policy)")
    p.add_argument("--bandwidth-mbps", type=float, metavar="MB/S",
                   help="cap on page data in MB/s, 0 = unlimited (default: the policy's, else "
                   f"{AGENT_DEFAULTS.bandwidth_mbps:g})")
    p.add_argument("--downtime-ms", type=float, metavar="MS",
                   help="pause budget of stop-and-copy in ms (default: the policy's, else "
                   f"{AGENT_DEFAULTS.downtime_ms:g})")
    p.add_argument("--max-rounds", type=int, metavar="N",
                   help="pre-copy rounds before stop-and-copy (default: the policy's, else "
                   f"{AGENT_DEFAULTS.max_rounds})")
    p.add_argument("--throttle", action=argparse.BooleanOptionalAction,
                   help="auto-converge: slow the guest's vCPUs when pre-copy cannot keep up "
                   "(default: the policy's, else " + ("on" if AGENT_DEFAULTS.throttle else "off") + ")")
    p.add_argument("--on-no-converge", choices=("abort", "force", "postcopy"),
                   help="if pre-copy cannot reach the downtime budget: abort (the VM stays on its "
                   "source), force (longer pause, exit code 3) or postcopy (the VM runs at the "
                   "destination while its remaining pages follow; needs QEMU with userfaultfd) "
                   "(default: the coordinator's migration_on_no_converge, abort)")
    p.add_argument("--throttle-final", action="store_true",
                   help="hold the pages sent while the VM is paused to --bandwidth-mbps too "
                   "(default: off, they go at link speed)")
    p.add_argument("--engine", choices=("novacron", "libvirt"),
                   help="novacron: our engine (a libvirt domain needs its RAM in a shared file); "
                   "libvirt: libvirt's own live migration, libvirt hosts only (default: the policy's, "
                   f"else {AGENT_DEFAULTS.engine})")
    p.add_argument("--force", action="store_true",
                   help="move it even if the target host is in maintenance")
    p.add_argument("--no-wait", action="store_true",
                   help="start it, print its id (for 'novacron migration show ID') and return")
    p.add_argument("--json", action="store_true", help="print the final migration as JSON")
    p.set_defaults(func=lambda a: _run(a, _migrate))


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
        print(f"novacron: error: {name_flags(str(exc), getattr(args, 'flag_names', {}))}",
              file=sys.stderr)
        return 1


# "body.options.max_rounds: ...", "body.labels.tier: ...", "query parameter 'limit': ..."
_API_FIELD = re.compile(r"\b(?:body|vm)((?:\.[^\s.:]+)+)(?=:)|query parameter '(\w+)'")


def name_flags(message: str, flags: dict[str, str]) -> str:
    """An API error with the JSON path of a field the user gave as a flag named by that flag
    (the innermost field that is a flag: ``body.labels.tier`` -> ``--label tier``)."""
    def repl(m: re.Match[str]) -> str:
        if m.group(2):
            return flags.get(m.group(2), m.group(0))
        parts = m.group(1)[1:].split(".")
        for i in reversed(range(len(parts))):
            if parts[i] in flags:
                return " ".join([flags[parts[i]], ".".join(parts[i + 1:])]).rstrip()
        return m.group(0)

    return _API_FIELD.sub(repl, message)


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
    table = list_table("Hosts")
    id_column(table, "name", [h["name"] for h in hosts])
    states = [host_state(h) for h in hosts]
    id_column(table, "state", [Text.from_markup(s).plain for s in states])
    for col in ("cpus", "memory", "free"):
        table.add_column(col, justify="right", min_width=len(col))
    table.add_column("seen", min_width=4)  # the last heartbeat
    table.add_column("vms", overflow="fold")
    if args.wide:
        table.add_column("agent", overflow="fold")
    for h, state in zip(hosts, states, strict=True):
        table.add_row(h["name"], state, str(h["cpus"]), human_bytes(h["memory_bytes"]),
                      human_bytes(h["memory_available_bytes"]), _age(h.get("last_heartbeat", 0)),
                      ", ".join(h.get("vms", [])) or "-", *([h["url"]] if args.wide else []))
    print_table(table) if hosts else print("no hosts registered")
    return 0


def host_state(h: dict[str, Any]) -> str:
    """up, down, draining (its VMs are being moved off) or maintenance (no new VMs:
    'novacron host maintenance NAME off' ends it)."""
    mode = h.get("lifecycle") or ("maintenance" if h.get("maintenance") else "active")
    if h["state"] != "up":
        return "[red]down[/red]" + (f", {mode}" if mode != "active" else "")
    if mode == "draining":
        return "[magenta]draining[/magenta]"
    return "[yellow]maintenance[/yellow]" if mode == "maintenance" else "[green]up[/green]"


async def _vms(client: CoordinatorClient, args: argparse.Namespace) -> int:
    vms = (await client.request("GET", "/vms?refresh=true"))["vms"]  # live states
    if args.json:
        _dump(vms)
        return 0
    table = list_table("VMs")
    id_column(table, "name", [v["name"] for v in vms])
    id_column(table, "host", [v["host"] for v in vms])
    for col in ("state", "vcpus", "memory"):
        table.add_column(col)
    for v in vms:
        table.add_row(v["name"], v["host"], v["state"], str(v["spec"].get("vcpus", "-")),
                      f"{v['spec'].get('memory_mb', '-')} MiB")
    print_table(table) if vms else print("no VMs")
    return 0


def add_list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vm", help="only this VM's migrations")
    p.add_argument("--limit", type=int, metavar="N", help="at most N, newest first (default: 100)")
    p.add_argument("--json", action="store_true", help="print JSON")


def list_table(title: str) -> Table:
    """A listing with light rules, so narrow terminals leave more room to the columns."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 collapse_padding=True)


def print_table(table: Table, console: Console | None = None) -> None:
    """Print a listing; wider than the terminal rather than cutting a column at its minimum
    (an ID column's minimum is the whole ID: the terminal wraps the line, the ID stays copyable)."""
    console = console or Console()
    need = Measurement.get(console, console.options.update_width(10_000), table).minimum
    if need <= console.width:
        console.print(table)
        return
    width = console.width
    console.width = need  # print(width=) would be clamped to the terminal's
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def id_column(table: Table, header: str, values: list[str], **kw: Any) -> None:
    """A column that is never cut or wrapped: names and IDs must stay copyable at any width."""
    width = max([len(header), *map(len, values)])
    table.add_column(header, no_wrap=True, min_width=width, **kw)


async def _migrations(client: CoordinatorClient, args: argparse.Namespace) -> int:
    query = {k: v for k in ("vm", "limit") if (v := getattr(args, k)) is not None}
    migs = (await client.request("GET", "/migrations" + (f"?{urlencode(query)}" if query else "")))[
        "migrations"]
    if args.json:
        _dump(migs)
        return 0
    table = list_table("Migrations")
    id_column(table, "id", [m["id"] for m in migs])
    id_column(table, "vm", [m["vm"] for m in migs])
    for col in ("from", "to", "phase", "policy", "downtime", "total", "started"):  # give way
        table.add_column(col, overflow="fold")
    for m in migs:
        met = m.get("metrics", {})
        table.add_row(m["id"], m["vm"], m["source"], m["target"], m["phase"], m.get("policy") or "-",
                      _fmt_metric("downtime_ms", met.get("downtime_ms")),
                      _fmt_metric("total_s", met.get("total_s")),
                      time.strftime("%m-%d %H:%M:%S", time.localtime(m["created_at"])))
    print_table(table) if migs else print("no migrations")
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


# nested metrics an operator reads beside the totals: the pause's parts and what the
# destination already held (RAM pages, disk clusters)
SHOWN_PARTS = ("downtime_parts", "dest_dedup", "disk_dedup")


def metrics_table(mig: dict[str, Any]) -> Table | None:
    """The migration's metrics; for one that did not complete only those that are not zero."""
    ok = mig.get("phase") == "completed"
    rows = [("rounds", str(mig.get("round", 0)))] if ok or mig.get("round") else []

    def shown(value: Any) -> bool:
        return not isinstance(value, (dict, list)) and (ok or value not in (0, 0.0, None, "", False))

    for key, value in sorted(mig.get("metrics", {}).items()):
        if key in SHOWN_PARTS and isinstance(value, dict):  # one level of these, as "part.figure"
            rows += [(f"{key}.{k}", _fmt_metric(k, v)) for k, v in sorted(value.items()) if shown(v)]
        elif shown(value):  # (the rest of the nested detail is in --json)
            rows.append((key, _fmt_metric(key, value)))
    if not rows:
        return None
    title = f"Migration {mig['id']} ({mig['phase']})"
    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


def print_failure(mig: dict[str, Any], console: Console) -> None:
    """For a migration that did not complete: why, and where the VM is (before any figures)."""
    what = mig.get("phase", "?")
    if what == "completed":
        return
    console.print(f"[bold red]migration {mig['id']} {what}[/bold red]: "
                  f"{mig.get('error') or 'no reason given'}", highlight=False, soft_wrap=True)
    if what in ("failed", "cancelled"):
        console.print(f"{mig['vm']} stays on {mig['source']}", highlight=False, soft_wrap=True)


def print_outcome(mig: dict[str, Any], console: Console) -> None:
    """A finished migration: its error first when it did not complete, then its figures."""
    print_failure(mig, console)
    if mig.get("phase") == "completed":
        console.print(f"{mig['vm']} moved from {mig['source']} to {mig['target']}",
                      highlight=False, soft_wrap=True)
    table = metrics_table(mig)
    if table is not None:
        console.print(table)


def progress_pct(mig: dict[str, Any]) -> float:
    """Data, not phase: the agent's acknowledged bytes against acked + remaining (it never
    runs backwards there); 100 once completed."""
    if mig.get("phase") == "completed":
        return 100.0
    pct = mig.get("metrics", {}).get("progress_pct")
    return float(pct) if isinstance(pct, (int, float)) else 0.0


def exit_code(mig: dict[str, Any]) -> int:
    if mig.get("phase") != "completed":
        return 1
    return EXIT_BUDGET_EXCEEDED if mig.get("budget_exceeded") else 0


POLICY_SOURCES = {"request": "named with the migration", "vm": "the VM's own policy",
                  "labels": "selected by the VM's labels", "default": "the coordinator's default"}


def format_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_option(v)}" for k, v in sorted(options.items()))


def applied_options(mig: dict[str, Any]) -> str:
    """The options the migration runs with: those sent, then the agent's defaults for the rest."""
    shown = format_options(mig.get("options") or {})
    return (shown + "; " if shown else "") + "the rest: agent defaults"


def _option(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def policy_line(mig: dict[str, Any]) -> str:
    """Which policy a migration runs under and why, and its options (shown before progress)."""
    name = mig.get("policy")
    head = (f"policy {name} ({POLICY_SOURCES.get(mig.get('policy_source') or '', '?')})"
            if name else "no policy")
    return f"{head}; options: {applied_options(mig)}"


def describe(mig: dict[str, Any]) -> str:
    """sent (acked by the destination) · remaining · rate · dirty rate · ETA"""
    met = mig.get("metrics", {})
    parts = [f"{mig.get('phase', '?'):>9}"]
    if mig.get("queue_reason"):
        parts.append(f"waits: {mig['queue_reason']}")
    if met.get("bytes_acked") is not None:
        parts.append(f"{human_bytes(met['bytes_acked'])} sent")
    if met.get("remaining_bytes") is not None and mig.get("phase") != "completed":
        parts.append(f"{human_bytes(met['remaining_bytes'])} left")
    if met.get("rate_bytes_s"):
        parts.append(f"{human_bytes(met['rate_bytes_s'])}/s")
    if met.get("dirty_rate_bytes_s"):
        parts.append(f"dirtying {human_bytes(met['dirty_rate_bytes_s'])}/s")
    if met.get("eta_s") is not None and mig.get("phase") != "completed":
        parts.append(f"ETA {met['eta_s']:.0f}s")
    return " · ".join(parts)


async def follow_migration(client: CoordinatorClient, mig: dict[str, Any],
                           console: Console) -> dict[str, Any]:
    """Show a live progress bar until the migration ends; return its final state."""
    with Progress(TextColumn(f"[bold]{mig['vm']}[/bold] {mig['source']} → {mig['target']}"),
                  BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(describe(mig), total=100)
        async for event in client.migration_events(mig["id"]):
            mig = event
            progress.update(task, completed=progress_pct(mig),
                            description=describe(mig))
    return mig


async def _migrate(client: CoordinatorClient, args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("bandwidth_mbps", args.bandwidth_mbps),
                                 ("downtime_ms", args.downtime_ms),
                                 ("max_rounds", args.max_rounds),
                                 ("on_no_converge", args.on_no_converge),
                                 ("throttle_final", args.throttle_final or None),
                                 ("engine", args.engine),
                                 ("throttle", args.throttle)) if v is not None}
    mig = await client.migrate(args.vm, args.target, options, force=args.force, policy=args.policy)
    if args.no_wait:
        _dump(mig) if args.json else print(mig["id"])
        return 0
    console = Console(stderr=args.json)
    try:
        if args.json:
            async for event in client.migration_events(mig["id"]):
                mig = event
        else:
            console.print(policy_line(mig), highlight=False, soft_wrap=True)
            mig = await follow_migration(client, mig, console)
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
        print_outcome(mig, console)
    return exit_code(mig)
