"""``GET /v1/audit``: this agent's audit log (``novacron.audit``), newest first."""

from __future__ import annotations

from aiohttp import web

from novacron import audit
from novacron.agent.api.common import json_error


async def list_audit(request: web.Request) -> web.Response:
    """Filters as the coordinator's ``GET /api/v1/audit``: since, until, actor, action, target, result, limit."""
    try:
        filters = audit.parse_query(request.query)
    except ValueError as exc:
        return json_error(400, f"query parameter {exc}")
    return web.json_response({"entries": await request.app[audit.AUDIT].query(**filters)})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/audit", list_audit)
