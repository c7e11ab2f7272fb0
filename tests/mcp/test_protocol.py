"""The server's protocol core and the client's result parsing, message by message."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from novacron.coordinator.mcp.client import parse_tool_result
from novacron.coordinator.mcp.errors import ToolError
from novacron.coordinator.mcp.protocol import McpProtocol, Tool, ToolContext, ToolFailure
from novacron.coordinator.mcp.stdio_server import lines


async def _echo(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    for i in range(3):
        await ctx.progress(i + 1, 3, f"step {i + 1}")
    return {"echo": args["text"]}


async def _refuse(_args: dict[str, Any], _ctx: ToolContext) -> Any:
    raise ToolFailure("host h1 is down")


async def _crash(_args: dict[str, Any], _ctx: ToolContext) -> Any:
    raise RuntimeError("bug with a secret inside")


SCHEMA = {"type": "object", "required": ["text"], "additionalProperties": False,
          "properties": {"text": {"type": "string", "maxLength": 10}}}
SERVER = McpProtocol([
    Tool("echo", "echo", SCHEMA, _echo),
    Tool("refuse", "refuse", {"type": "object"}, _refuse),
    Tool("crash", "crash", {"type": "object"}, _crash),
])


def req(method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


async def answer(msg: Any, **kw: Any) -> dict[str, Any]:
    out = await SERVER.handle(msg, **kw)
    assert out is not None
    return out


async def test_initialize_negotiates_a_handshake_version() -> None:
    ok = await answer(req("initialize", {"protocolVersion": "2024-11-05", "capabilities": {}}))
    assert ok["result"]["protocolVersion"] == "2024-11-05"
    assert ok["result"]["serverInfo"]["name"] == "novacron"
    newer = await answer(req("initialize", {"protocolVersion": "2099-01-01"}))
    assert newer["result"]["protocolVersion"] == "2025-11-25"  # our latest; the client decides
    bad = await answer(req("initialize", {}))
    assert bad["error"]["code"] == -32602


async def test_modern_requests_carry_their_version() -> None:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
    found = await answer(req("server/discover", {"_meta": meta}))
    assert "2026-07-28" in found["result"]["supportedVersions"]
    assert found["result"]["resultType"] == "complete"
    listed = await answer(req("tools/list", {"_meta": meta}), header_version="2026-07-28")
    assert listed["result"]["ttlMs"] == 0 and len(listed["result"]["tools"]) == 3
    assert listed["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "novacron"
    mismatch = await answer(req("tools/list", {"_meta": meta}), header_version="2025-06-18")
    assert mismatch["error"]["code"] == -32020
    wrong_method = await answer(req("tools/list", {"_meta": meta}), header_method="tools/call")
    assert wrong_method["error"]["code"] == -32020
    unknown = await answer(req("server/discover", {
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2030-01-01"}}))
    assert unknown["error"]["code"] == -32022
    assert "2026-07-28" in unknown["error"]["data"]["supported"]


async def test_jsonrpc_errors() -> None:
    assert (await answer(req("nope")))["error"]["code"] == -32601
    assert (await answer(req("tools/list", params=[1])))["error"]["code"] == -32602
    assert (await answer(req("tools/list", {"cursor": "x"})))["error"]["code"] == -32602
    assert (await answer({"id": 1, "method": "ping"}))["error"]["code"] == -32600
    assert (await answer(req("ping", rid={"x": 1})))["error"]["code"] == -32600
    assert (await answer(req("ping", rid=[1])))["error"]["code"] == -32600
    assert (await answer(req("tools/call", {"name": "missing"})))["error"]["code"] == -32602
    assert (await answer(req("tools/call", {"arguments": {}})))["error"]["code"] == -32602
    assert (await answer(req("tools/call", {"name": "echo", "arguments": [1]})))["error"][
        "code"] == -32602
    assert (await answer(req("ping")))["result"] == {}
    # notifications and stray responses get no answer at all
    assert await SERVER.handle({"jsonrpc": "2.0", "method": "notifications/initialized"}) is None
    assert await SERVER.handle({"jsonrpc": "2.0", "id": 9, "result": {}}) is None


async def test_tool_failures_are_results_not_crashes() -> None:
    invalid = await answer(req("tools/call", {"name": "echo", "arguments": {"text": "x" * 11}}))
    assert invalid["result"]["isError"] is True
    assert "text" in invalid["result"]["content"][0]["text"]
    refused = await answer(req("tools/call", {"name": "refuse"}))
    assert refused["result"]["isError"] is True
    assert refused["result"]["content"][0]["text"] == "host h1 is down"
    crashed = await answer(req("tools/call", {"name": "crash"}))
    assert crashed["result"]["isError"] is True
    assert "secret" not in json.dumps(crashed)  # the trace goes to the log, not the client


async def test_progress_only_with_a_token() -> None:
    sent: list[dict[str, Any]] = []

    async def notify(msg: dict[str, Any]) -> None:
        sent.append(msg)

    call = {"name": "echo", "arguments": {"text": "hi"}}
    quiet = await answer(req("tools/call", call), notify=notify)
    assert quiet["result"]["structuredContent"] == {"echo": "hi"} and sent == []
    loud = await answer(req("tools/call", {**call, "_meta": {"progressToken": "p1"}}),
                        notify=notify)
    assert loud["result"]["isError"] is False
    assert [m["params"]["progress"] for m in sent] == [1, 2, 3]
    assert {m["params"]["progressToken"] for m in sent} == {"p1"}
    assert sent[-1]["params"] == {"progressToken": "p1", "progress": 3, "total": 3,
                                  "message": "step 3"}


def _text(payload: Any) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": json.dumps(payload)}]}


def test_parse_tool_result() -> None:
    assert parse_tool_result("t", _text({"success": True, "x": 1})) == {"success": True, "x": 1}
    assert parse_tool_result("t", {"content": [{"type": "text", "text": "plain"}]}) == "plain"
    with pytest.raises(ToolError, match="boom"):
        parse_tool_result("t", _text({"success": False, "error": "boom"}))
    with pytest.raises(ToolError, match="Task not found"):
        parse_tool_result("t", _text({"status": "not_found", "error": "Task not found"}))
    with pytest.raises(ToolError, match="bad"):
        parse_tool_result("t", {"isError": True, "content": [{"type": "text", "text": "bad"}]})
    with pytest.raises(ToolError, match="malformed"):
        parse_tool_result("t", ["not", "an", "object"])
    # an error field next to success: true is data, not a failure
    assert parse_tool_result("t", _text({"success": True, "error": "x"}))["success"] is True


async def test_stdio_lines_are_bounded() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b'{"a":1}\n' + b"x" * 5000 + b"\n" + b'{"b":2}\n' + b"y" * 3000)
    reader.feed_eof()
    got = [line async for line in lines(reader, max_line=1024)]
    assert got == [b'{"a":1}', None, b'{"b":2}', None]


def test_tool_arguments_names_must_match_fully() -> None:
    """MCP tool schemas use the coordinator's validator: "$" is the end of the name."""
    from novacron.coordinator.mcp.tools import NAME

    async def noop(_args: dict[str, Any], _ctx: ToolContext) -> Any:
        return None

    tool = Tool("t", "test", {"type": "object", "properties": {"vm": NAME}}, noop)
    assert tool.argument_errors({"vm": "vm1"}) == []
    assert tool.argument_errors({"vm": "vm1\n"})[0].startswith("vm: ")
