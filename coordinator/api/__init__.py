"""The coordinator's REST API (``/api/v1``): one module per feature.

HOW TO ADD A ROUTE MODULE (scheduler, classifier, MCP bridge, ...)
------------------------------------------------------------------
1. Create ``coordinator/api/<feature>.py`` with a module-level ``routes`` table
   (``novacron.coordinator.api.openapi.RouteTable``) and decorate handlers::

       from typing import Any
       from aiohttp import web
       from novacron.coordinator.api.errors import ApiError
       from novacron.coordinator.api.keys import STORE
       from novacron.coordinator.api.openapi import RouteTable, json_body

       routes = RouteTable("scheduler", "Placement decisions")

       PLAN_REQUEST: dict[str, Any] = {
           "type": "object", "additionalProperties": False,
           "required": ["vcpus", "memory_mb"],
           "properties": {"vcpus": {"type": "integer", "minimum": 1, "maximum": 512},
                          "memory_mb": {"type": "integer", "minimum": 16}},
       }
       PLAN_RESPONSE: dict[str, Any] = {
           "type": "object", "required": ["host"], "properties": {"host": {"type": "string"}},
       }

       @routes.post("/scheduler/plan", "Choose a host for a VM", request=PLAN_REQUEST,
                    response=PLAN_RESPONSE, errors=(409,))
       async def plan(request: web.Request) -> web.Response:
           body = json_body(request)                 # parsed + validated already
           hosts = await request.app[STORE].list_hosts()
           if not hosts:
               raise ApiError(409, "no hosts are registered")   # -> {"error": ...}, 409
           return web.json_response({"host": hosts[0].name})

   - Paths are relative to ``/api/v1``; ``{name}`` path segments must be names
     (``openapi.NAME_SCHEMA``) and are checked before your handler runs.
   - ``auth="admin"`` (default) needs the admin token, ``"agent"`` the agent
     token, ``"public"`` none. Tokens are checked by middleware, not by you.
     ``"host"`` (heartbeat) only requires some credential; the handler checks
     it against the host's bound identity (``novacron.coordinator.identity``).
   - ``request=`` is a JSON schema (draft 2020-12); a body that fails it gets a
     400 naming the field. Use ``additionalProperties: False`` and bounds.
   - ``query={"limit": {"type": "integer", "minimum": 1}}`` declares query
     parameters; read them with ``query_params(request)``.
   - ``errors=(404, 409, 502)`` lists extra error statuses for the document.
   - Raise ``ApiError(status, message)`` for any client-visible failure; never
     let an exception escape as a 500 for bad input.
2. Optionally define ``setup(app: web.Application) -> None`` in the module to
   put your service on the app (``app[MY_KEY] = ...``, declare the key with
   ``web.AppKey`` in your module) or to add ``app.cleanup_ctx`` background tasks.
   It runs after the shared keys below are set (but before the store is open;
   use a cleanup_ctx to do I/O at startup).
3. Add ``"novacron.coordinator.api.<feature>"`` to ``ROUTE_MODULES`` below
   (one-line edit). The OpenAPI document (``/api/v1/openapi.json``) then lists
   your routes automatically, and the schemathesis test in tests/coordinator/
   fuzzes them: they must never answer 5xx to bad input.

Shared services are on the app under the keys in ``novacron.coordinator.api.keys``
(CONFIG, STORE, AGENTS, PLACER, MIGRATIONS, EVENTS). For persistence see
``novacron.coordinator.store`` (documents, or your own numbered migrations).
Test a route module against a real server:
``novacron.coordinator.service.build_app(cfg)`` with aiohttp's ``TestServer``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Route modules the app loads, in the order their tags appear in the document.
ROUTE_MODULES = [
    "novacron.coordinator.api.health",
    "novacron.coordinator.api.hosts",
    "novacron.coordinator.api.drains",
    "novacron.coordinator.api.vms",
    "novacron.coordinator.api.migrations",
    "novacron.coordinator.api.swarms",
    "novacron.coordinator.api.tasks",
    "novacron.coordinator.api.placements",
    "novacron.coordinator.api.dashboard",
    "novacron.coordinator.api.audit",
    "novacron.coordinator.api.images",
]


def load_route_modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in ROUTE_MODULES]
