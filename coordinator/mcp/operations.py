"""The one table that maps NovaCron's eight swarm operations onto claude-flow tools.

claude-flow v3 and v2 name and shape their tools differently (DESIGN "MCP
facts"); the dialect is picked from what ``tools/list`` actually returns. An
operation is a short chain of tool calls: each step builds its arguments from
the operation's arguments and the results of the steps before it (v3 creates
a task and then assigns it where v2 had one ``task_orchestrate``). A step
whose builder returns None is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from novacron.coordinator.mcp.errors import UnsupportedOperation

Args = dict[str, Any]
Builder = Callable[[Args, list[Any]], Args | None]

OPERATIONS = (
    "swarm_init", "agent_spawn", "task_orchestrate", "swarm_status",
    "agent_list", "agent_metrics", "task_status", "task_results",
    "swarm_shutdown",  # not one of the eight: how a swarm is ended (and a failed plan undone)
)


@dataclass(frozen=True)
class Step:
    tool: str
    build: Builder


def _clean(**kw: Any) -> Args:
    """Drop unset optional arguments: servers reject explicit nulls."""
    return {k: v for k, v in kw.items() if v is not None}


def _result_field(results: list[Any], index: int, *names: str) -> Any:
    doc = results[index] if index < len(results) else None
    if isinstance(doc, dict):
        for name in names:
            if doc.get(name) is not None:
                return doc[name]
        task = doc.get("task")
        if isinstance(task, dict):
            for name in names:
                if task.get(name) is not None:
                    return task[name]
    raise KeyError(f"step {index + 1} returned no {' / '.join(names)}")


V3: dict[str, list[Step]] = {
    "swarm_init": [Step("swarm_init", lambda a, _r: _clean(
        topology=a["topology"], maxAgents=a.get("max_agents"), strategy=a.get("strategy")))],
    "agent_spawn": [Step("agent_spawn", lambda a, _r: _clean(
        agentType=a["agent_type"], agentId=a.get("agent_id"), swarmId=a.get("swarm_id")))],
    "task_orchestrate": [
        Step("task_create", lambda a, _r: _clean(
            type=a.get("task_type") or "feature", description=a["description"],
            priority=a.get("priority"))),
        Step("task_assign", lambda a, r: {
            "taskId": _result_field(r, 0, "taskId", "id"), "agentIds": list(a["agents"]),
        } if a.get("agents") else None),
    ],
    "swarm_status": [Step("swarm_status", lambda a, _r: _clean(swarmId=a.get("swarm_id")))],
    "agent_list": [Step("agent_list", lambda a, _r: _clean(status=a.get("status")))],
    "agent_metrics": [
        Step("agent_status", lambda a, _r: {"agentId": a["agent_id"]}),
        Step("agent_health", lambda a, _r: {"agentId": a["agent_id"]}),
    ],
    "task_status": [Step("task_status", lambda a, _r: {"taskId": a["task_id"]})],
    # v3 has no task_results tool: a task's result is part of its status.
    "task_results": [Step("task_status", lambda a, _r: {"taskId": a["task_id"]})],
    "swarm_shutdown": [Step("swarm_shutdown", lambda a, _r: {"swarmId": a["swarm_id"]})],
}

# v2 spells the middle priority "medium" where v3 (and NovaCron's plans) say "normal".
_V2_PRIORITY = {"normal": "medium"}


def _v2_priority(value: Any) -> Any:
    return _V2_PRIORITY.get(value, value) if isinstance(value, str) else value


V2: dict[str, list[Step]] = {
    "swarm_init": [Step("swarm_init", lambda a, _r: _clean(
        topology=a["topology"], maxAgents=a.get("max_agents"), strategy=a.get("strategy")))],
    "agent_spawn": [Step("agent_spawn", lambda a, _r: _clean(
        type=a["agent_type"], name=a.get("agent_id"), swarmId=a.get("swarm_id")))],
    "task_orchestrate": [Step("task_orchestrate", lambda a, _r: _clean(
        task=a["description"], strategy=a.get("strategy"),
        priority=_v2_priority(a.get("priority"))))],
    "swarm_status": [Step("swarm_status", lambda a, _r: _clean(swarmId=a.get("swarm_id")))],
    "agent_list": [Step("agent_list", lambda a, _r: _clean(swarmId=a.get("swarm_id")))],
    "agent_metrics": [Step("agent_metrics", lambda a, _r: {"agentId": a["agent_id"]})],
    "task_status": [Step("task_status", lambda a, _r: {"taskId": a["task_id"]})],
    "task_results": [Step("task_results", lambda a, _r: {"taskId": a["task_id"]})],
    "swarm_shutdown": [Step("swarm_destroy", lambda a, _r: {"swarmId": a["swarm_id"]})],
}

DIALECTS: dict[str, dict[str, list[Step]]] = {"v3": V3, "v2": V2}


def detect_dialect(tool_names: set[str]) -> str:
    """The dialect whose tools the server lists (v3 preferred)."""
    for name, table in DIALECTS.items():
        needed = {step.tool for steps in table.values() for step in steps}
        if needed <= tool_names:
            return name
    raise UnsupportedOperation(
        "the MCP server lists neither claude-flow v3 nor v2 swarm tools "
        f"({len(tool_names)} tools listed)"
    )


def steps_for(dialect: str, operation: str) -> list[Step]:
    if operation not in OPERATIONS:
        raise UnsupportedOperation(f"unknown operation {operation!r}")
    return DIALECTS[dialect][operation]
