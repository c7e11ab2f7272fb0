"""Bearer-token auth, decided per route by its declared ``auth`` role.

``admin`` routes take the admin token; ``agent`` routes (register, heartbeat)
take the agent (bootstrap) token; ``host`` routes (heartbeat) take the host's own
credential, checked by the handler (``novacron.coordinator.identity``); ``metrics``
(``/metrics``) the admin or the metrics token; ``public`` (health) takes none. Tokens are compared in
constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from novacron import audit, tls
from novacron.coordinator.api.errors import error_response
from novacron.coordinator.api.keys import CONFIG
from novacron.coordinator.api.openapi import API_PREFIX


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_ok(given: str, expected: str) -> bool:
    if not expected:
        return False  # an unset token never authenticates anyone
    return hmac.compare_digest(given.encode(), expected.encode())


def actor_of(role: str) -> str:
    """Who the audit log names for a request authenticated as ``role``: the credential's name."""
    return "anonymous" if role == "public" else role


def make_auth_middleware(roles: dict[tuple[str, str], str]) -> Middleware:
    """``roles`` maps (method, resource canonical path) to the route's auth role."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else request.path
        role = roles.get((request.method, canonical))
        if role is None and request.method == "HEAD":
            role = roles.get(("GET", canonical))
        if role is None:
            # Unknown routes under the API still need a token, so they reveal nothing.
            role = "admin" if request.path.startswith(API_PREFIX) else "public"
        if role == "host":
            # The handler checks the host's own credential against the name's binding.
            if bearer(request) is None and tls.peer_common_name(request.transport) is None:
                return error_response(401, "missing host credential (a client certificate, "
                                           "or 'Authorization: Bearer <this host's token>')")
        elif role != "public":
            cfg = request.app[CONFIG]
            token = bearer(request)
            if token is None:
                return error_response(401, "missing 'Authorization: Bearer <token>' header")
            if role == "metrics":
                expected = [cfg.admin_token, cfg.metrics_token]
            else:
                expected = [cfg.agent_token if role == "agent" else cfg.admin_token]
            if not any([token_ok(token, e) for e in expected]):  # all compared: constant time
                return error_response(401, f"invalid token for this route (needs the {role} token)")
        audit.set_actor(request, actor_of(role))
        return await handler(request)

    return auth_middleware
