"""Streamable HTTP transport for NovaCron's MCP server: ``POST /mcp`` on the coordinator.

One JSON-RPC message per POST (batches were dropped from MCP in 2025-06-18).
A request is answered with ``application/json``, or with a
``text/event-stream`` carrying progress notifications before the response
when the client accepts SSE and asked for progress. Notifications and
responses get 202. ``initialize`` opens a session (``Mcp-Session-Id``); an
unknown session id is 404 so the client starts over; ``DELETE`` ends one.
2026-07-28 requests need no session. Auth is the API's admin bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from novacron import audit, httpjson
from novacron.coordinator.mcp.appkeys import MCP_SERVER
from novacron.coordinator.mcp.protocol import (
    HANDSHAKE_VERSIONS,
    HEADER_MISMATCH,
    INVALID_REQUEST,
    MODERN_VERSIONS,
    PARSE_ERROR,
    McpProtocol,
    error_response,
)
from novacron.coordinator.mcp.tools import build_tools

log = logging.getLogger("novacron.coordinator.mcp.http")

MCP_PATH = "/mcp"
MAX_SESSIONS = 1024
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"

SESSIONS: web.AppKey[OrderedDict[str, str]] = web.AppKey("mcp_sessions")


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc), content_type="application/json",
                        headers=headers)


def _authorized(request: web.Request) -> bool:
    from novacron.coordinator.api.auth import bearer, token_ok
    from novacron.coordinator.api.keys import CONFIG

    token = bearer(request)
    return token is not None and token_ok(token, request.app[CONFIG].admin_token)


def _origin_ok(request: web.Request) -> bool:
    # DNS-rebinding guard from the MCP spec: a browser page of another origin is refused.
    origin = request.headers.get("Origin")
    if not origin:
        return True
    return urlsplit(origin).netloc == request.host


async def _guard(request: web.Request) -> web.Response | None:
    if not _origin_ok(request):
        return _json(403, {"error": "Origin not allowed"})
    if not _authorized(request):
        return _json(401, {"error": "missing or invalid bearer token"},
                     {"WWW-Authenticate": 'Bearer realm="novacron"'})
    from novacron.coordinator.api.auth import actor_of

    audit.set_actor(request, actor_of("admin"))
    return None


async def post_mcp(request: web.Request) -> web.StreamResponse:
    refused = await _guard(request)
    if refused is not None:
        return refused
    if request.content_type != "application/json":
        return _json(415, error_response(None, INVALID_REQUEST, "Content-Type must be application/json"))
    accept = request.headers.get("Accept", "*/*")
    if not any(a in accept for a in ("application/json", "text/event-stream", "*/*")):
        return _json(406, error_response(None, INVALID_REQUEST,
                                         "Accept must allow application/json or text/event-stream"))
    try:
        raw = await request.read()  # bounded by the app's client_max_size
    except web.HTTPRequestEntityTooLarge:
        return _json(413, error_response(None, INVALID_REQUEST, "request body too large"))
    except (ConnectionError, asyncio.IncompleteReadError):
        return _json(400, error_response(None, PARSE_ERROR, "body could not be read"))
    try:
        msg = httpjson.loads(raw)
    except ValueError:
        return _json(400, error_response(None, PARSE_ERROR, "body is not valid JSON"))
    if isinstance(msg, list):
        return _json(400, error_response(None, INVALID_REQUEST, "JSON-RPC batches are not supported"))
    if not isinstance(msg, dict):
        return _json(400, error_response(None, INVALID_REQUEST, "expected a JSON-RPC object"))

    header_version = request.headers.get(VERSION_HEADER)
    if header_version is not None and header_version not in (*HANDSHAKE_VERSIONS, *MODERN_VERSIONS):
        return _json(400, error_response(msg.get("id"), INVALID_REQUEST,
                                         f"unsupported {VERSION_HEADER} {header_version!r}"))
    sessions = request.app[SESSIONS]
    method = msg.get("method")
    session = request.headers.get(SESSION_HEADER)
    modern = header_version in MODERN_VERSIONS
    if session is not None and method != "initialize" and not modern and session not in sessions:
        return _json(404, error_response(msg.get("id"), INVALID_REQUEST, "unknown or expired MCP session"))

    server = request.app[MCP_SERVER]
    if "id" not in msg or method is None:
        await server.handle(msg)
        return web.Response(status=202)

    extra: dict[str, str] = {}
    if method == "initialize":
        session = secrets.token_urlsafe(24)
        sessions[session] = "open"
        while len(sessions) > MAX_SESSIONS:
            sessions.popitem(last=False)
        extra[SESSION_HEADER] = session
    elif session is not None and session in sessions:
        sessions.move_to_end(session)

    params = msg.get("params")
    wants_progress = (
        method == "tools/call" and isinstance(params, dict)
        and isinstance(params.get("_meta"), dict) and "progressToken" in params["_meta"]
    )
    if wants_progress and "text/event-stream" in accept:
        return await _answer_sse(request, server, msg, header_version, extra)
    answer = await server.handle(msg, header_version=header_version,
                                 header_method=request.headers.get(METHOD_HEADER))
    status = 200
    if answer is not None and answer.get("error", {}).get("code") == HEADER_MISMATCH:
        status = 400
    if method == "initialize" and answer is not None and "error" in answer:
        sessions.pop(session or "", None)
        extra.pop(SESSION_HEADER, None)
    return _json(status, answer, extra)


async def _answer_sse(request: web.Request, server: McpProtocol, msg: dict[str, Any],
                      header_version: str | None, extra: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **extra})
    await resp.prepare(request)
    counter = 0

    gone = False

    async def send(event: dict[str, Any]) -> None:
        nonlocal counter, gone
        if gone:
            return  # the client left; the tool still finishes (a migration is not abandoned)
        counter += 1
        data = json.dumps(event, separators=(",", ":"))
        try:
            await resp.write(f"id: {counter}\nevent: message\ndata: {data}\n\n".encode())
        except (ConnectionError, RuntimeError):
            gone = True

    answer = await server.handle(msg, notify=send, header_version=header_version,
                                 header_method=request.headers.get(METHOD_HEADER))
    if answer is not None:
        await send(answer)
    if not gone:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
    return resp


async def get_mcp(request: web.Request) -> web.Response:
    refused = await _guard(request)
    if refused is not None:
        return refused
    # No server-initiated messages outside a request: the spec's answer is 405.
    return web.Response(status=405, headers={"Allow": "POST, DELETE"})


async def delete_mcp(request: web.Request) -> web.Response:
    refused = await _guard(request)
    if refused is not None:
        return refused
    session = request.headers.get(SESSION_HEADER, "")
    if request.app[SESSIONS].pop(session, None) is None:
        return _json(404, {"error": "unknown MCP session"})
    return web.Response(status=204)


def setup_mcp_http(app: web.Application) -> None:
    """Mount ``/mcp`` and NovaCron's MCP server on the coordinator app."""
    app[MCP_SERVER] = McpProtocol(build_tools(app))
    app[SESSIONS] = OrderedDict()
    app.router.add_post(MCP_PATH, post_mcp)
    app.router.add_get(MCP_PATH, get_mcp)
    app.router.add_delete(MCP_PATH, delete_mcp)
