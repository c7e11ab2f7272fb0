"""Health and the API's own description."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from novacron import __version__
from novacron.coordinator.api.keys import INSTANCE, LEASES
from novacron.coordinator.api.openapi import RouteTable

routes = RouteTable("meta", "Health and the API document")

OPENAPI_DOC: web.AppKey[dict[str, Any]] = web.AppKey("openapi_doc", dict)

HEALTH: dict[str, Any] = {
    "type": "object",
    "required": ["status", "version"],
    "properties": {
        "status": {"const": "ok"}, "version": {"type": "string"},
        "instance": {"type": "string", "description": "this coordinator among those sharing a database"},
        "leases": {"type": "array", "items": {"type": "string"},
                   "description": "once-per-fleet loops this coordinator runs now"},
    },
}


@routes.get("/health", "Liveness (no token needed)", auth="public", response=HEALTH)
async def health(request: web.Request) -> web.Response:
    return web.json_response({
        "status": "ok", "version": __version__, "instance": request.app[INSTANCE],
        "leases": sorted(name for name, lease in request.app[LEASES].items() if lease.held)})


@routes.get("/openapi.json", "This API as an OpenAPI 3 document", auth="public",
            response={"type": "object", "required": ["openapi", "paths"]})
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_DOC])
