"""NovaCron's MCP server driven by an independent client: the official Python `mcp` SDK.

Both transports: Streamable HTTP at /mcp on a real coordinator (legacy
handshake and the 2026-07-28 discover style), and stdio through a real
`novacron mcp` process. The fleet behind the coordinator is the coordinator
tests' fake agents, so listing, placing and migrating run the real handlers.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.coordinator.conftest import Coordinator, agents, coordinator  # noqa: F401
from tests.coordinator.fake_agent import FakeAgent
from tests.coordinator.test_api import vm_spec

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:ping is removed")]

EXPECTED_TOOLS = {"list_hosts", "list_vms", "place_vm", "migrate_vm", "classify_task",
                  "plan_task", "bridge_health", "list_swarms"}


def _payload(result: Any) -> Any:
    text = "".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    try:
        return json.loads(text)
    except ValueError:
        return text


@contextlib.asynccontextmanager
async def _http_client(c: Coordinator, mode: str) -> AsyncIterator[Client]:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {c.cfg.admin_token}"})
    async with http:
        transport = streamable_http_client(c.url + "/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            yield client


async def _exercise(client: Client, fleet: list[FakeAgent], *, legacy: bool = True) -> None:
    tools = await client.list_tools()
    assert {t.name for t in tools.tools} == EXPECTED_TOOLS
    place = next(t for t in tools.tools if t.name == "place_vm")
    assert place.input_schema["required"] == ["vcpus", "memory_mb"]

    hosts = await client.call_tool("list_hosts", {})
    assert not hosts.is_error
    assert sorted(h["name"] for h in _payload(hosts)["hosts"]) == sorted(a.name for a in fleet)
    assert all("token" not in h for h in _payload(hosts)["hosts"])

    placed = await client.call_tool("place_vm", {"vcpus": 1, "memory_mb": 512})
    assert not placed.is_error and _payload(placed)["host"] == "alpha"  # the most free memory

    too_big = await client.call_tool("place_vm", {"vcpus": 1, "memory_mb": 4 << 20})
    assert too_big.is_error and "no up host" in _payload(too_big)

    bad_args = await client.call_tool("place_vm", {"vcpus": "two"})
    assert bad_args.is_error and "invalid arguments" in _payload(bad_args)

    classified = await client.call_tool("classify_task", {
        "description": "Fix the typo in the README's install section"})
    assert not classified.is_error
    label = _payload(classified)
    assert label["label"] in ("simple", "medium", "complex", "very-complex")
    assert 0 < label["confidence"] <= 1 and label["reasons"]
    planned = await client.call_tool("plan_task", {
        "description": "Replicate the coordinator's state across three regions with automatic "
                       "failover"})
    assert not planned.is_error
    plan = _payload(planned)
    assert plan["topology"] and plan["agents"] and plan["tasks"]
    blank = await client.call_tool("classify_task", {"description": "   "})
    assert blank.is_error and "empty" in _payload(blank)

    bridge = await client.call_tool("bridge_health", {})
    assert not bridge.is_error and _payload(bridge)["status"] in ("idle", "ok")
    swarms = await client.call_tool("list_swarms", {"active_only": True})
    assert _payload(swarms) == {"swarms": [], "agents": [], "tasks": []}

    with pytest.raises(MCPError) as err:
        await client.call_tool("no_such_tool", {})
    assert err.value.error.code == -32602

    if legacy:  # ping was removed in 2026-07-28
        await client.send_ping()


async def test_streamable_http_legacy_handshake(coordinator: Coordinator,  # noqa: F811
                                                agents: list[FakeAgent]) -> None:  # noqa: F811
    async with _http_client(coordinator, "legacy") as client:
        assert client.session.initialize_result is not None
        assert client.protocol_version == "2025-11-25"
        assert client.server_info is not None and client.server_info.name == "novacron"
        await _exercise(client, agents)


async def test_streamable_http_2026_discover(coordinator: Coordinator,  # noqa: F811
                                             agents: list[FakeAgent]) -> None:  # noqa: F811
    async with _http_client(coordinator, "auto") as client:
        # The SDK probes server/discover first and stays in the modern era when answered.
        assert client.session.discover_result is not None
        assert client.protocol_version == "2026-07-28"
        assert client.server_info is not None and client.server_info.name == "novacron"
        await _exercise(client, agents, legacy=False)


async def test_migrate_reports_progress(coordinator: Coordinator,  # noqa: F811
                                        agents: list[FakeAgent]) -> None:  # noqa: F811
    status, vm = await coordinator.call("POST", "/vms", json=vm_spec("web"))
    assert status == 201, vm
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async with _http_client(coordinator, "legacy") as client:
        result = await client.call_tool("migrate_vm", {"vm": "web", "target": "beta"},
                                        progress_callback=on_progress)
        assert not result.is_error, _payload(result)
        assert _payload(result)["phase"] == "completed"
        again = await client.call_tool("migrate_vm", {"vm": "web", "target": "beta"})
        assert again.is_error and "already on host" in _payload(again)
        unknown = await client.call_tool("migrate_vm", {"vm": "web", "target": "alpha",
                                                        "policy": "nope"})
        assert unknown.is_error and "no migration policy 'nope'" in _payload(unknown)
    messages = [m for _d, _t, m in progress]
    assert any(m and m.startswith("precopy") for m in messages), messages
    assert progress[-1][0] == progress[-1][1]  # the last report is "done"
    assert [d for d, _t, _m in progress] == sorted(d for d, _t, _m in progress)


async def test_http_auth_and_bad_requests(coordinator: Coordinator) -> None:  # noqa: F811
    url = coordinator.url + "/mcp"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=init, headers=accept) as resp:
            assert resp.status == 401
        async with http.post(url, json=init, headers={**accept, "Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
        auth = {**accept, **coordinator.headers()}
        async with http.post(url, data=b"{not json", headers={
                **auth, "Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == -32700
        huge = {**init, "params": {**init["params"], "pad": "x" * 100_000}}
        async with http.post(url, json=huge, headers=auth) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == -32600
        async with http.post(url, json=[init], headers=auth) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == -32600
        async with http.post(url, json=init, headers={**auth, "Origin": "http://evil.example"}) as resp:
            assert resp.status == 403
        async with http.post(url, json=init, headers=auth) as resp:
            assert resp.status == 200
            session = resp.headers["Mcp-Session-Id"]
            assert (await resp.json())["result"]["protocolVersion"] == "2025-06-18"
        s_auth = {**auth, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"}
        async with http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                             headers=s_auth) as resp:
            assert resp.status == 202
        async with http.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "resources/list"},
                             headers=s_auth) as resp:
            assert (await resp.json())["error"]["code"] == -32601
        async with http.post(url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                        "params": {"name": 7}}, headers=s_auth) as resp:
            assert (await resp.json())["error"]["code"] == -32602
        async with http.get(url, headers=s_auth) as resp:
            assert resp.status == 405
        async with http.delete(url, headers=s_auth) as resp:
            assert resp.status == 204
        async with http.post(url, json={"jsonrpc": "2.0", "id": 4, "method": "ping"},
                             headers=s_auth) as resp:
            assert resp.status == 404  # the session is gone: the client must start over


async def test_stdio_transport(coordinator: Coordinator,  # noqa: F811
                               agents: list[FakeAgent], tmp_path: Path) -> None:  # noqa: F811
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "novacron"),
        args=["--server", coordinator.url, "mcp"],
        env={"NOVACRON_TOKEN": coordinator.cfg.admin_token, "HOME": str(tmp_path),
             "PATH": "/usr/bin:/bin"},
    )
    async with Client(params, mode="legacy") as client:
        assert client.session.initialize_result is not None
        assert client.protocol_version == "2025-11-25"
        assert client.server_info is not None and client.server_info.name == "novacron"
        await _exercise(client, agents)
        vms = await client.call_tool("list_vms", {"host": "alpha"})
        assert _payload(vms) == {"vms": []}
        # progress notifications travel back over stdio too (SSE from /mcp, lines on stdout)
        status, _vm = await coordinator.call("POST", "/vms", json=vm_spec("db"))
        assert status == 201
        seen: list[float] = []

        async def on_progress(done: float, _total: float | None, _msg: str | None) -> None:
            seen.append(done)

        moved = await client.call_tool("migrate_vm", {"vm": "db", "target": "beta"},
                                       progress_callback=on_progress)
        assert not moved.is_error and _payload(moved)["phase"] == "completed"
        assert len(seen) >= 3 and seen == sorted(seen)

    async with Client(params, mode="auto") as modern:  # 2026-07-28 over stdio as well
        assert modern.protocol_version == "2026-07-28"
        hosts = await modern.call_tool("list_hosts", {"state": "up"})
        assert len(_payload(hosts)["hosts"]) == len(agents)
        bad = await modern.call_tool("list_hosts", {"state": "sideways"})
        assert bad.is_error

    wrong = StdioServerParameters(command=params.command, args=params.args,
                                  env={**(params.env or {}), "NOVACRON_TOKEN": "wrong-token"})
    with pytest.raises(BaseException) as refused:
        async with Client(wrong, mode="legacy"):
            pass
    assert "HTTP 401" in _messages(refused.value)


def _messages(exc: BaseException) -> str:
    """Every message inside an exception (group), for checking what a client was told."""
    if isinstance(exc, BaseExceptionGroup):
        return " | ".join(_messages(e) for e in exc.exceptions)
    return str(exc)
