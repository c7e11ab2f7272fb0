"""``novacron swarm create|list|show|delete``: claude-flow swarms run by the coordinator."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from novacron.cli.fleet import _dump, _run, id_column, print_table
from novacron.coordinator.client import CoordinatorClient

MAX_PLAN_BYTES = 64 * 1024  # a plan is a few hundred bytes; the API caps bodies anyway


def register(sub: argparse._SubParsersAction) -> None:
    swarm = sub.add_parser("swarm", help="run a task as a claude-flow swarm; list, show, delete")
    cmds = swarm.add_subparsers(dest="swarm_command", metavar="ACTION", required=True)

    p = cmds.add_parser("create", help="run TEXT as a swarm (the classifier plans it)",
                        description="Run a task described by TEXT as a claude-flow swarm. The "
                        "coordinator's classifier plans it unless --plan gives the plan.")
    p.add_argument("text", metavar="TEXT", help="the task, in words")
    p.add_argument("--plan", type=Path, metavar="FILE",
                   help="JSON plan to run instead of the classifier's (topology, agents, tasks)")
    p.add_argument("--json", action="store_true", help="print the swarm as JSON")
    p.set_defaults(func=_create)

    p = cmds.add_parser("list", help="swarms created through the coordinator")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(a, _list))

    for action, text, fn in (("show", "one swarm with its live and task status", _show),
                             ("delete", "shut a swarm down in claude-flow", _delete)):
        p = cmds.add_parser(action, help=text)
        p.add_argument("id", metavar="ID", help="swarm id (from 'novacron swarm list')")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=lambda a, fn=fn: _run(a, fn))


def read_plan(path: Path) -> dict[str, Any]:
    """The plan in FILE; ValueError with a one-line reason if it is unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise ValueError(f"{path} is over {MAX_PLAN_BYTES} bytes")
    try:
        plan = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{path}: a plan is a JSON object")
    return plan


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"description": args.text}
    if args.plan is not None:
        try:
            body["plan"] = read_plan(args.plan)
        except ValueError as exc:
            print(f"novacron swarm create: error: {exc}", file=sys.stderr)
            return 2
    args.body = body
    return _run(args, _create_swarm)


async def _create_swarm(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("POST", "/swarms", args.body)
    if args.json:
        _dump(doc)
    else:
        print(f"swarm {doc['id']} {doc['status']}: {len(doc.get('agents', []))} agents, "
              f"{len(doc.get('tasks', []))} tasks ({doc.get('topology') or '-'})")
    return 0


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


async def _list(client: CoordinatorClient, args: argparse.Namespace) -> int:
    swarms = (await client.request("GET", "/swarms"))["swarms"]
    if args.json:
        _dump(swarms)
        return 0
    table = Table(title="Swarms", title_justify="left")
    id_column(table, "id", [s["id"] for s in swarms])
    for col in ("status", "topology", "agents", "tasks", "created", "description"):
        table.add_column(col)
    for s in swarms:
        table.add_row(s["id"], s["status"], s.get("topology") or "-",
                      str(len(s.get("agents", []))), str(len(s.get("tasks", []))),
                      _when(s.get("created_at")), s.get("description", "")[:60])
    print_table(table) if swarms else print("no swarms")
    return 0


async def _show(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("GET", f"/swarms/{quote(args.id, safe='')}")
    if args.json:
        _dump(doc)
        return 0
    console = Console()
    live = doc.get("live")
    console.print(f"[bold]swarm {doc['id']}[/bold] {doc['status']}"
                  + (f" (claude-flow: {live.get('status', '?')})" if isinstance(live, dict)
                     else " (claude-flow: not reachable)"))
    if doc.get("description"):
        console.print(doc["description"])
    if doc.get("error"):
        console.print(f"[red]error:[/red] {doc['error']}")
    console.print(f"agents: {', '.join(doc.get('agents', [])) or '-'}")
    states = {str(t.get("taskId")): t for t in doc.get("task_states", []) if isinstance(t, dict)}
    if doc.get("tasks"):
        table = Table(title="Tasks", title_justify="left")
        table.add_column("task")
        table.add_column("status")
        for task_id in doc["tasks"]:
            table.add_row(task_id, str(states.get(task_id, {}).get("status", "-")))
        console.print(table)
    return 0


async def _delete(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.request("DELETE", f"/swarms/{quote(args.id, safe='')}")
    if args.json:
        _dump(doc)
    else:
        print(f"swarm {doc['id']}: {doc['status']}")
    return 0
