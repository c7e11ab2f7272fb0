"""NovaCron's MCP tools, implemented on the coordinator's own services.

Each tool calls what the REST API calls (store, placer, migration manager,
classifier, claude-flow bridge) through the app's keys, so MCP and HTTP
clients see one behaviour. A service this coordinator does not have answers
with a tool error naming it; refusals of the services (``ApiError``) become
tool errors carrying their message.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from novacron.coordinator.api import keys
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.mcp.appkeys import CLAUDE_FLOW
from novacron.coordinator.mcp.protocol import Tool, ToolContext, ToolFailure
from novacron.coordinator.mcp.registry import BridgeRegistry
from novacron.coordinator.migration_policies import POLICY_NAME

NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
DESCRIPTION = {"type": "string", "minLength": 1, "maxLength": 4000}
# Phases of a migration in order; progress is reported as the index of the current one.
PHASES = ("pending", "prepare", "precopy", "stopcopy", "postcopy", "commit", "completed")
MAX_WAIT_S = 3600.0


def _service(app: web.Application, key_name: str) -> Any:
    """A coordinator service by its ``api.keys`` name; ToolFailure if this app lacks it."""
    key = getattr(keys, key_name, None)
    if key is None or key not in app:
        raise ToolFailure(f"this coordinator has no {key_name.lower()} service")
    return app[key]


def _refusal(exc: ApiError) -> ToolFailure:
    return ToolFailure(f"{exc.message} (HTTP {exc.status})")


def _classifier(app: web.Application) -> Any:
    """The coordinator's TaskService (``novacron.coordinator.api.keys.CLASSIFIER``)."""
    from novacron.coordinator.api.keys import CLASSIFIER

    service = app.get(CLASSIFIER)
    if service is None:
        raise ToolFailure("the task classifier is not loaded on this coordinator")
    return service


async def _classifier_call(app: web.Application, method: str, text: str) -> dict[str, Any]:
    from novacron.coordinator.classifier.model import InvalidTask

    service = _classifier(app)
    try:
        # onnxruntime inference takes well under a millisecond: no thread hop needed
        result: dict[str, Any] = getattr(service, method)(text)
    except InvalidTask as exc:
        raise ToolFailure(str(exc)) from None
    return result


def build_tools(app: web.Application) -> list[Tool]:
    async def list_hosts(args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        store = _service(app, "STORE")
        hosts = [h.public() for h in await store.list_hosts()]
        if "state" in args:
            hosts = [h for h in hosts if h["state"] == args["state"]]
        return {"hosts": hosts}

    async def list_vms(args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        store = _service(app, "STORE")
        return {"vms": [v.public() for v in await store.list_vms(args.get("host"))]}

    async def place_vm(args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        store, placer = _service(app, "STORE"), _service(app, "PLACER")
        spec = {"vcpus": args["vcpus"], "memory_mb": args["memory_mb"]}
        hosts = await store.list_hosts()
        try:
            host = await placer(spec, hosts, await store.vm_summaries())
        except ApiError as exc:
            raise _refusal(exc) from None
        if host is None:
            raise ToolFailure(f"no up host has {args['vcpus']} vCPUs and {args['memory_mb']} MiB "
                              f"free ({len(hosts)} hosts known)")
        return {"host": host.name, "spec": spec, "candidates": len(hosts)}

    async def migrate_vm(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        manager, events = _service(app, "MIGRATIONS"), _service(app, "EVENTS")
        from novacron.coordinator.migrations import topic

        try:
            mig = await manager.start(args["vm"], args["target"], args.get("options", {}),
                                      policy=args.get("policy"))
        except ApiError as exc:
            raise _refusal(exc) from None
        doc: dict[str, Any] = mig.public()
        await ctx.progress(0, len(PHASES) - 1, f"{doc['phase']}: migration {mig.id} started")
        if not args.get("wait", True):
            return doc
        store = _service(app, "STORE")
        deadline = time.monotonic() + float(args.get("timeout_s", 600))
        with events.subscribe(topic(mig.id)) as sub:
            while doc.get("phase") not in ("completed", "failed", "cancelled"):
                left = deadline - time.monotonic()
                if left <= 0:
                    doc["note"] = "still running; stopped waiting (timeout_s)"
                    return doc
                event = await sub.get(timeout=min(left, 2.0))
                if event is None:
                    # Terminal states are stored before they are published: re-read to be sure.
                    fresh = await store.get_migration(mig.id)
                    if fresh is None:
                        raise ToolFailure(f"migration {mig.id} disappeared")
                    event = fresh.public()
                if event.get("phase") != doc.get("phase") or event.get("round") != doc.get("round"):
                    phase = str(event.get("phase"))
                    step = PHASES.index(phase) if phase in PHASES else 0
                    await ctx.progress(step, len(PHASES) - 1,
                                       f"{phase} (round {event.get('round', 0)})")
                doc = event
        if doc.get("phase") != "completed":
            raise ToolFailure(f"migration {mig.id} {doc.get('phase')}: {doc.get('error') or 'no reason'}")
        return doc

    async def classify_task(args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        return await _classifier_call(app, "classify", args["description"])

    async def plan_task(args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        return await _classifier_call(app, "plan", args["description"])

    async def bridge_health(_args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        client = app.get(CLAUDE_FLOW)
        if client is None:
            raise ToolFailure("the claude-flow bridge is not enabled on this coordinator")
        return client.health()

    async def list_swarms(args: dict[str, Any], _ctx: ToolContext) -> dict[str, Any]:
        client = app.get(CLAUDE_FLOW)
        registry = client.registry if client is not None else None
        if registry is None:
            store = _service(app, "STORE")
            registry = BridgeRegistry(store)
        active = bool(args.get("active_only", False))
        return {"swarms": await registry.list("swarm", active_only=active),
                "agents": await registry.list("agent", active_only=active),
                "tasks": await registry.list("task", active_only=active)}

    obj = {"type": "object", "additionalProperties": False}
    return [
        Tool("list_hosts", "List the fleet's hypervisor hosts with capacity and state.",
             {**obj, "properties": {"state": {"enum": ["up", "down"]}}}, list_hosts),
        Tool("list_vms", "List VMs, optionally only those on one host.",
             {**obj, "properties": {"host": NAME}}, list_vms),
        Tool("place_vm", "Choose the host a new VM of this size would be placed on (no VM is "
             "created).",
             {**obj, "required": ["vcpus", "memory_mb"], "properties": {
                 "vcpus": {"type": "integer", "minimum": 1, "maximum": 512},
                 "memory_mb": {"type": "integer", "minimum": 16, "maximum": 4194304}}},
             place_vm),
        Tool("migrate_vm", "Live-migrate a running VM to another host (a stopped VM moves "
             "offline: its definition only). With wait (default) the "
             "call returns when the migration ends, reporting each phase as progress.",
             {**obj, "required": ["vm", "target"], "properties": {
                 "vm": NAME, "target": NAME, "options": {"type": "object"},
                 "policy": {"type": "string", "pattern": POLICY_NAME,
                            "description": "a migration policy; options override single ones"},
                 "wait": {"type": "boolean"},
                 "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S}}},
             migrate_vm, read_only=False),
        Tool("classify_task", "Classify a task description with NovaCron's ONNX classifier: "
             "simple, medium, complex or very-complex, a calibrated confidence and reasons. "
             "Below its calibrated threshold it abstains: label null, abstained true and "
             "best_guess.",
             {**obj, "required": ["description"], "properties": {"description": DESCRIPTION}},
             classify_task),
        Tool("plan_task", "Plan a task: its class and the claude-flow swarm (topology, agents, "
             "estimated duration) that would run it; when the classifier abstains the plan is "
             "conservative (planned_as). POST /api/v1/swarms executes such a plan.",
             {**obj, "required": ["description"], "properties": {"description": DESCRIPTION}},
             plan_task),
        Tool("bridge_health", "Health of the claude-flow MCP bridge (pings, restarts, tools).",
             {**obj, "properties": {}}, bridge_health),
        Tool("list_swarms", "Swarms, agents and tasks the bridge created through claude-flow.",
             {**obj, "properties": {"active_only": {"type": "boolean"}}}, list_swarms),
    ]
