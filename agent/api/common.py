"""Shared pieces of the agent API: JSON errors, body parsing, auth, error mapping."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from novacron import audit, httpjson
from novacron.agent.qmp import QMPClosedError, QMPError, QMPTimeoutError
from novacron.agent.vm.errors import VMError
from novacron.agent.vm.spec import SpecError
from novacron.connlimits import LogLimiter

log = logging.getLogger("novacron.agent.api")

PUBLIC_PATHS = frozenset({"/v1/health"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY: web.RequestKey[Any] = web.RequestKey("novacron_agent_body", object)  # parsed, for the audit log


def body_of(request: web.Request) -> Any:
    """The JSON body a handler parsed (None if it read none): the audit log takes names from it."""
    return request.get(BODY)


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _bad_body(problem: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": f"request body: {problem}"}), content_type="application/json")


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong."""
    raw = await request.read()  # bounded by the app's client_max_size (413 beyond)
    try:
        doc = httpjson.loads(raw) if raw else None
    except ValueError as exc:
        raise _bad_body(f"invalid JSON ({exc})") from None
    request[BODY] = doc
    if not isinstance(doc, dict):
        raise _bad_body("expected a JSON object")
    return doc


def actor_of(request: web.Request) -> str:
    """The credential an authenticated request used, as the audit log names it.

    Today one bearer token opens the agent API (held by the coordinator and, for a
    migration's destination, the source agent), so the credential is that token.
    """
    return "api-token"
# Set by the migration routes: may ``Authorization: Grant <grant>`` read this path?
GrantRead = Callable[[str, str], bool]  # (grant, path) -> allowed
GRANT_READ: web.AppKey[GrantRead] = web.AppKey("novacron_agent_grant_read")


def _grant_may_read(request: web.Request, given: str) -> bool:
    scheme, _, grant = given.partition(" ")
    may_read = request.app.get(GRANT_READ)
    return (scheme == "Grant" and request.method in ("GET", "HEAD") and may_read is not None
            and may_read(grant.strip(), request.path))


def auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()
    refusals = LogLimiter(log)  # one line per 10 s: a flood of bad tokens must not flood the log

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            given = request.headers.get("Authorization", "")
            if _grant_may_read(request, given):
                return await handler(request)  # a migration's source reading its outcome here
            if not token or not hmac.compare_digest(given.encode(), expected):
                refusals.warning("refused", "request refused: bad token", path=request.path,
                                 remote=request.remote)
                return json_error(401, "missing or invalid bearer token")
            audit.set_actor(request, actor_of(request))
        return await handler(request)

    return check_token


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes ``{"error": ...}`` with a fitting status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)
    except SpecError as exc:
        return json_error(400, str(exc))
    except VMError as exc:
        return json_error(exc.status, str(exc))
    except QMPTimeoutError as exc:
        return json_error(504, f"QEMU did not answer: {exc}")
    except (QMPError, QMPClosedError) as exc:
        return json_error(502, f"QEMU refused: {exc}")
    except Exception as exc:
        log.exception("request failed", extra={"path": request.path, "method": request.method})
        return json_error(500, f"internal error: {type(exc).__name__}")
