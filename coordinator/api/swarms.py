"""Swarms through the claude-flow bridge, the bridge's health, and the ``/mcp`` endpoint.

``POST /swarms`` takes a task description and runs the classifier's plan for
it (or a plan given in the request) through claude-flow: one swarm, its
agents, its tasks. What was created is kept in the store (``mcp.*`` documents)
and followed by ``GET /swarms/{id}``. ``setup`` also mounts NovaCron's own MCP
server at ``/mcp`` (Streamable HTTP, admin token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
from aiohttp import web

from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import CONFIG, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body
from novacron.coordinator.mcp.appkeys import CLAUDE_FLOW
from novacron.coordinator.mcp.client import ClaudeFlowClient
from novacron.coordinator.mcp.config import client_settings
from novacron.coordinator.mcp.errors import (
    ArgumentError,
    McpError,
    RpcError,
    ToolError,
    TransportError,
    UnsupportedOperation,
)
from novacron.coordinator.mcp.http import setup_mcp_http
from novacron.coordinator.mcp.install import NotInstalled
from novacron.coordinator.mcp.registry import BridgeRegistry

log = logging.getLogger("novacron.coordinator.api.swarms")

routes = RouteTable("swarms", "claude-flow swarms run through the MCP bridge")

TOPOLOGIES = ["mesh", "hierarchical", "hierarchical-mesh", "ring", "star", "hybrid", "adaptive"]
TOKEN = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$"}

PLAN: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["topology", "agents", "tasks"],
    "properties": {
        "topology": {"enum": TOPOLOGIES},
        "strategy": {"enum": ["specialized", "balanced", "adaptive"]},
        "max_agents": {"type": "integer", "minimum": 1, "maximum": 50},
        "agents": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
            "type": "object", "additionalProperties": False, "required": ["type"],
            "properties": {"type": TOKEN}}},
        "tasks": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
            "type": "object", "additionalProperties": False, "required": ["description"],
            "properties": {
                "description": {"type": "string", "minLength": 1, "maxLength": 4000},
                "type": TOKEN,
                "priority": {"enum": ["low", "normal", "high", "critical"]}}}},
    },
}

_PLAN_CHECK = jsonschema.Draft202012Validator(PLAN)

CREATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["description"],
    "properties": {
        "description": {"type": "string", "minLength": 1, "maxLength": 4000},
        "plan": PLAN,
    },
}

SWARM: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status"],
    "properties": {
        "id": {"type": "string"}, "status": {"type": "string"}, "error": {"type": "string"},
        "description": {"type": "string"}, "topology": {"type": ["string", "null"]},
        "plan": {"type": "object"},
        "agents": {"type": "array", "items": {"type": "string"}},
        "tasks": {"type": "array", "items": {"type": "string"}},
        "task_states": {"type": "array", "items": {"type": "object"}},
        "live": {"type": ["object", "null"]},
        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
    },
}

HEALTH: dict[str, Any] = {
    "type": "object",
    "required": ["enabled", "status"],
    "properties": {
        "enabled": {"type": "boolean"}, "status": {"type": "string"},
        "pid": {"type": ["integer", "null"]}, "server": {"type": "object"},
        "dialect": {"type": "string"}, "tools": {"type": "integer"},
        "restarts": {"type": "integer"}, "last_ping_ms": {"type": ["number", "null"]},
        "last_error": {"type": "string"}, "active": {"type": "object"},
    },
}


def _bridge(request: web.Request) -> ClaudeFlowClient:
    client = request.app.get(CLAUDE_FLOW)
    if client is None:
        raise ApiError(503, "the claude-flow bridge is disabled on this coordinator")
    return client


def _bridge_failure(exc: McpError, doing: str) -> ApiError:
    """Map bridge failures onto statuses: our input 400, claude-flow's refusal 502, down 503."""
    if isinstance(exc, ArgumentError):
        return ApiError(400, f"{doing}: {exc}")
    if isinstance(exc, (NotInstalled, TransportError)):
        return ApiError(503, f"{doing}: claude-flow unavailable: {exc}")
    if isinstance(exc, (ToolError, RpcError, UnsupportedOperation)):
        return ApiError(502, f"{doing}: claude-flow refused: {exc}")
    return ApiError(503, f"{doing}: {exc}")


async def _plan_for(request: web.Request, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the executable plan, the whole plan document) for the request."""
    if "plan" in body:
        return dict(body["plan"]), dict(body["plan"])
    from novacron.coordinator.api.keys import CLASSIFIER
    from novacron.coordinator.classifier.model import InvalidTask

    service = request.app.get(CLASSIFIER)
    if service is None:
        raise ApiError(503, "no plan given and the task classifier is not loaded; "
                       "send a 'plan' with the request")
    try:
        planned: dict[str, Any] = service.plan(body["description"])
    except InvalidTask as exc:
        raise ApiError(400, f"body.description: {exc}") from None
    plan = {k: planned[k] for k in PLAN["properties"] if k in planned}
    problems = sorted(_PLAN_CHECK.iter_errors(plan), key=lambda e: list(e.absolute_path))
    if problems:
        raise ApiError(502, f"the classifier's plan cannot be executed: {problems[0].message}")
    return plan, planned


@routes.post("/swarms", "Run a task as a claude-flow swarm: the classifier's plan for the "
             "description (or the plan given) executed through the MCP bridge", request=CREATE,
             response=SWARM,
             status=201, errors=(400, 502, 503))
async def create_swarm(request: web.Request) -> web.Response:
    body: dict[str, Any] = json_body(request)
    client = _bridge(request)
    plan, planned = await _plan_for(request, body)
    try:
        swarm = await client.swarm_init(plan["topology"], plan.get("max_agents"),
                                        plan.get("strategy"))
    except McpError as exc:
        raise _bridge_failure(exc, "starting the swarm") from None
    swarm_id = str(swarm.get("swarmId") or "")
    if not swarm_id:
        raise ApiError(502, "claude-flow created a swarm but returned no swarmId")
    agents: list[str] = []
    tasks: list[str] = []
    fields = {"description": body["description"], "plan": planned, "agents": agents,
              "tasks": tasks, "topology": plan["topology"]}
    try:
        for agent in plan["agents"]:
            spawned = await client.agent_spawn(agent["type"], swarm_id=swarm_id)
            agents.append(str(spawned.get("agentId")))
        for task in plan["tasks"]:
            created = await client.task_orchestrate(
                task["description"], task_type=task.get("type"), priority=task.get("priority"),
                agents=agents)
            tasks.append(str(created.get("taskId")))
    except McpError as exc:
        # Half a plan is worse than none: end the swarm, and keep the record of what happened.
        with contextlib.suppress(McpError):
            await client.swarm_shutdown(swarm_id)
        await client.registry.record("swarm", swarm_id, {
            **fields, "status": "failed", "error": str(exc)})
        log.warning("swarm plan failed; swarm shut down",
                    extra={"swarm": swarm_id, "error": str(exc)})
        raise _bridge_failure(exc, f"running the swarm plan (swarm {swarm_id} shut down)") from None
    doc = await client.registry.record("swarm", swarm_id, {
        **fields, "status": swarm.get("status", "running")})
    log.info("swarm created", extra={"swarm": swarm_id, "agents": len(agents), "tasks": len(tasks)})
    return web.json_response(_public(doc), status=201)


@routes.delete("/swarms/{id}", "Shut a swarm down in claude-flow", response=SWARM,
               errors=(404, 502, 503))
async def delete_swarm(request: web.Request) -> web.Response:
    client = _bridge(request)
    swarm_id = request.match_info["id"]
    if await client.registry.get("swarm", swarm_id) is None:
        raise ApiError(404, f"no swarm {swarm_id!r}")
    try:
        await client.swarm_shutdown(swarm_id)
    except McpError as exc:
        raise _bridge_failure(exc, f"shutting swarm {swarm_id} down") from None
    doc = await client.registry.get("swarm", swarm_id) or {"id": swarm_id}
    log.info("swarm shut down", extra={"swarm": swarm_id})
    return web.json_response(_public(doc))


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "status", "error", "description", "topology", "plan", "agents", "tasks",
            "task_states", "live", "created_at", "updated_at")
    out = {k: doc[k] for k in keys if k in doc}
    out.setdefault("status", "unknown")
    return out


@routes.get("/swarms", "Swarms created through the bridge", response={
    "type": "object", "required": ["swarms"],
    "properties": {"swarms": {"type": "array", "items": SWARM}}})
async def list_swarms(request: web.Request) -> web.Response:
    registry = _registry(request)
    return web.json_response({"swarms": [_public(d) for d in await registry.list("swarm")]})


@routes.get("/swarms/{id}", "One swarm, with the live status of it and its tasks from "
            "claude-flow when reachable", response=SWARM, errors=(404,))
async def get_swarm(request: web.Request) -> web.Response:
    registry = _registry(request)
    swarm_id = request.match_info["id"]
    doc = await registry.get("swarm", swarm_id)
    if doc is None:
        raise ApiError(404, f"no swarm {swarm_id!r}")
    client = request.app.get(CLAUDE_FLOW)
    live: dict[str, Any] | None = None
    states: list[dict[str, Any]] = []
    if client is not None:
        with contextlib.suppress(McpError):
            live = await client.swarm_status(swarm_id)
            for task_id in doc.get("tasks", []):
                result = await client.task_results(task_id)
                states.append(result)
    doc = await registry.get("swarm", swarm_id) or doc
    doc = {**doc, "live": live, "task_states": states}
    return web.json_response(_public(doc))


@routes.get("/mcp/health", "Health of the claude-flow MCP bridge (pings, restarts) and the "
            "swarms, agents and tasks it is following", response=HEALTH)
async def mcp_health(request: web.Request) -> web.Response:
    client = request.app.get(CLAUDE_FLOW)
    registry = _registry(request)
    active = {kind: len(await registry.list(kind, active_only=True))
              for kind in ("swarm", "agent", "task")}
    if client is None:
        return web.json_response({"enabled": False, "status": "disabled", "active": active})
    return web.json_response({"enabled": True, **client.health(), "active": active})


def _registry(request: web.Request) -> BridgeRegistry:
    client = request.app.get(CLAUDE_FLOW)
    return client.registry if client is not None else BridgeRegistry(request.app[STORE])


def setup(app: web.Application) -> None:
    setup_mcp_http(app)
    bridge = app[CONFIG].mcp
    if not bridge.enabled:
        return
    settings = client_settings(bridge, app[CONFIG].data_dir / "claude-flow")
    app[CLAUDE_FLOW] = ClaudeFlowClient(settings, BridgeRegistry(app[STORE]))
    eager = bridge.eager

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client = app[CLAUDE_FLOW]
        starting: asyncio.Task[None] | None = None
        if eager:
            # In the background: a slow or missing claude-flow must not hold up the API.
            starting = asyncio.create_task(client.start(), name="claude-flow-start")
            starting.add_done_callback(_log_start_failure)
        try:
            yield
        finally:
            if starting is not None and not starting.done():
                starting.cancel()
            await client.close()

    app.cleanup_ctx.append(lifecycle)


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("claude-flow did not start", extra={"error": str(task.exception())})
