"""JSON over HTTP: error documents, non-JSON bodies, the body cap, and the clients built on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from novacron.coordinator.agent_client import AgentClient, AgentError
from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.httpjson import HttpError, ResponseTooLarge, request_json


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    never = asyncio.Event()

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"a": 1})

    async def refused(_: web.Request) -> web.Response:
        return web.json_response({"error": "no VM named 'x'"}, status=404)

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="<html>gateway</html>", status=502)

    async def huge(_: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await resp.prepare(_)
        for _i in range(64):
            await resp.write(b" " * 4096)
        await resp.write_eof()
        return resp

    async def hang(_: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"phase": "precopy"}\n\ndata: {not json\n\n')
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/api/v1/migrations/m-1/events", events)
    app.router.add_get("/api/v1/migrations/m-404/events", refused)
    for path, handler in (("/ok", ok), ("/refused", refused), ("/text", text), ("/huge", huge),
                          ("/hang", hang)):
        app.router.add_get(path, handler)
        app.router.add_get("/api/v1" + path, handler)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield srv
    finally:
        await srv.close()


async def test_request_json(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/") + "/"
    async with aiohttp.ClientSession() as session:
        assert await request_json(session, "GET", base + "ok") == {"a": 1}
        with pytest.raises(HttpError) as err:
            await request_json(session, "GET", base + "refused")
        assert (err.value.status, err.value.message) == (404, "no VM named 'x'")
        with pytest.raises(HttpError) as err:
            await request_json(session, "GET", base + "text")
        assert (err.value.status, err.value.message, err.value.reason) == (502, "", "Bad Gateway")
        with pytest.raises(ResponseTooLarge):
            await request_json(session, "GET", base + "huge", limit=100_000)
        assert await request_json(session, "GET", base + "huge", limit=1 << 20) is None  # not JSON


async def test_agent_client_maps_failures_and_keeps_its_timeout(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    client = AgentClient(timeout_s=0.5)
    await client.start()
    try:
        assert await client.call("h", base, "t", "GET", "/ok") == {"a": 1}
        with pytest.raises(AgentError) as err:
            await client.call("h", base, "t", "GET", "/refused")
        assert err.value.status == 404 and str(err.value) == "agent h: no VM named 'x'"
        with pytest.raises(AgentError, match="HTTP 502"):
            await client.call("h", base, "t", "GET", "/text")
        # no per-call timeout: the client's own applies (not none at all)
        with pytest.raises(AgentError, match="unreachable") as err:
            await asyncio.wait_for(client.call("h", base, "t", "GET", "/hang"), 30)
        assert err.value.status == 0
    finally:
        await client.close()


async def test_coordinator_client_maps_failures(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with CoordinatorClient(base, "tok") as client:
        assert await client.request("GET", "/ok") == {"a": 1}
        with pytest.raises(ApiClientError) as err:
            await client.request("GET", "/refused")
        assert str(err.value) == "no VM named 'x' (HTTP 404)"
        with pytest.raises(ApiClientError, match=r"Bad Gateway \(HTTP 502\)"):
            await client.request("GET", "/text")


async def test_migration_events_refuse_a_bad_event(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with CoordinatorClient(base, "tok") as client:
        seen = []
        with pytest.raises(ApiClientError, match="bad event"):
            async for event in client.migration_events("m-1"):
                seen.append(event)
        assert seen == [{"phase": "precopy"}]
        with pytest.raises(ApiClientError, match="no VM named 'x'") as err:
            async for _event in client.migration_events("m-404"):
                pass
        assert err.value.status == 404
