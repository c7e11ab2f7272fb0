"""Drains: empty a host (maintenance, then every VM live-migrated off it), and follow it.

``POST /hosts/{name}/drain`` ``{"max_parallel": N}`` (optional) -> 202 and the drain
document (``novacron.coordinator.drains``); ``GET /drains/{id}``, ``GET /drains``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import CONFIG, INSTANCE, MIGRATIONS, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body
from novacron.coordinator.drains import MAX_PARALLEL, DrainManager

routes = RouteTable("drains", "Draining hosts and applying rebalance plans")
DRAINS: web.AppKey[DrainManager] = web.AppKey("drains", DrainManager)

DRAIN_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "max_parallel": {"type": "integer", "minimum": 1, "maximum": MAX_PARALLEL,
                         "description": "VMs moving at once (default: the coordinator's "
                         "migration_limit_outbound)"},
    },
}
_NULLABLE = {"type": ["string", "null"]}
DRAIN: dict[str, Any] = {
    "type": "object",
    "required": ["id", "kind", "host", "state", "max_parallel", "vms"],
    "properties": {
        "id": {"type": "string"}, "kind": {"enum": ["drain", "rebalance"]},
        "host": _NULLABLE, "state": {"enum": ["running", "done", "failed"]},
        "max_parallel": {"type": "integer"},
        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
        "finished_at": {"type": ["number", "null"]},
        "vms": {"type": "array", "items": {
            "type": "object", "required": ["vm", "source", "target", "migration", "state", "error"],
            "properties": {
                "vm": {"type": "string"}, "source": {"type": "string"}, "target": _NULLABLE,
                "migration": _NULLABLE, "error": _NULLABLE,
                "state": {"enum": ["pending", "queued", "migrating", "moved", "failed"]},
            }}},
    },
}


@routes.post("/hosts/{name}/drain", "Drain a host: put it in maintenance, then live-migrate "
             "every VM off it through the scheduler (a VM that cannot move stays, reported)",
             request=DRAIN_REQUEST, response=DRAIN, status=202, errors=(400, 404, 409))
async def drain(request: web.Request) -> web.Response:
    body = json_body(request) or {}
    max_parallel = int(body.get("max_parallel", request.app[CONFIG].migration_limit_outbound))
    doc = await request.app[DRAINS].drain(request.match_info["name"], max_parallel)
    return web.json_response(doc, status=202)


@routes.get("/drains", "Drains and applied rebalance plans, newest first",
            response={"type": "object", "required": ["drains"],
                      "properties": {"drains": {"type": "array", "items": DRAIN}}})
async def list_drains(request: web.Request) -> web.Response:
    return web.json_response({"drains": await request.app[DRAINS].all()})


@routes.get("/drains/{id}", "One drain: each VM's target, migration and outcome",
            response=DRAIN, errors=(404,))
async def get_drain(request: web.Request) -> web.Response:
    drain_id = request.match_info["id"]
    if not drain_id.startswith("d-"):
        raise ApiError(404, f"no drain {drain_id!r}")
    return web.json_response(await request.app[DRAINS].get(drain_id))


async def _drains(app: web.Application) -> AsyncIterator[None]:
    await app[DRAINS].resume_all()
    yield
    await app[DRAINS].close()


def setup(app: web.Application) -> None:
    app[DRAINS] = DrainManager(app[CONFIG], app[STORE], app[MIGRATIONS], app[INSTANCE])
    app.cleanup_ctx.append(_drains)
