"""``GET /api/v1/audit``: the coordinator's audit log (``novacron.audit``), or one host agent's."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from novacron import audit
from novacron.coordinator.agent_client import AgentError
from novacron.coordinator.api import schemas
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import AGENTS, STORE
from novacron.coordinator.api.openapi import RouteTable, query_params

routes = RouteTable("audit", "Who changed what: the append-only audit log")

_TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 256}
QUERY: dict[str, dict[str, Any]] = {
    "since": {**_TEXT, "description": "ISO 8601 time; entries at or after it"},
    "until": {**_TEXT, "description": "ISO 8601 time; entries at or before it"},
    "actor": {**_TEXT, "description": "exact actor, e.g. admin, agent"},
    "action": {**_TEXT, "description": "substring of the action, case-insensitive"},
    "target": {**_TEXT, "description": "exact target, e.g. a VM name"},
    "result": {"enum": ["ok", "refused", "error"]},
    "limit": {"type": "integer", "minimum": 1, "maximum": audit.MAX_QUERY_LIMIT,
              "description": "at most this many entries (default 100)"},
    "host": {**schemas.NAME, "description": "that host agent's audit log instead"},
}

ENTRY: dict[str, Any] = {
    "type": "object",
    "required": ["time", "actor", "remote", "action", "target", "result"],
    "properties": {
        "time": {"type": "string"}, "actor": {"type": "string"}, "remote": {"type": "string"},
        "action": {"type": "string"}, "target": {"type": "string"},
        "result": {"enum": ["ok", "refused", "error"]}, "status": {"type": "integer"},
        "duration_ms": {"type": "number"}, "suppressed": {"type": "integer"},
    },
}


@routes.get("/audit", "Audit entries, newest first", query=QUERY,
            response=schemas.list_of("entries", ENTRY), errors=(404, 502))
async def list_audit(request: web.Request) -> web.Response:
    params = query_params(request)
    host_name = params.pop("host", None)
    try:
        filters = audit.parse_query(params)
    except ValueError as exc:
        raise ApiError(400, f"query parameter {exc}") from None
    if host_name is None:
        return web.json_response({"entries": await request.app[audit.AUDIT].query(**filters)})
    host = await request.app[STORE].get_host(host_name)
    if host is None:
        raise ApiError(404, f"no host named {host_name!r}")
    path = "/v1/audit?" + urlencode({k: str(v) for k, v in params.items()})
    try:
        doc = await request.app[AGENTS].call(host.name, host.url, host.token, "GET", path, timeout_s=30)
    except AgentError as exc:
        raise ApiError(502, f"reading the audit log of {host.name}: {exc}") from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ApiError(502, f"agent {host.name} answered no audit entries")
    return web.json_response({"entries": entries})
