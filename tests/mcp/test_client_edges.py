"""Client edges that claude-flow never shows: misbehaving peers and dialect choice."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from novacron.coordinator.mcp import operations
from novacron.coordinator.mcp.client import ClaudeFlowClient, ClientSettings
from novacron.coordinator.mcp.errors import RpcError, TransportError, UnsupportedOperation
from novacron.coordinator.mcp.stdio_session import StdioSession

# A peer that answers initialize correctly, then floods one oversized line.
FLOODER = textwrap.dedent("""
    import json, sys
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("method") == "initialize":
            print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {
                "protocolVersion": "2024-11-05", "capabilities": {},
                "serverInfo": {"name": "flooder", "version": "0"}}}), flush=True)
        elif msg.get("method") == "tools/list":
            print(json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                              "result": {"tools": [], "pad": "x" * 300000}}), flush=True)
""")


async def test_oversized_line_kills_the_session(tmp_path: Path) -> None:
    client = ClaudeFlowClient(ClientSettings(
        command=[sys.executable, "-c", FLOODER], workdir=tmp_path / "w", max_line=65536,
        start_timeout=10, backoff=0.01, ping_interval=0))
    with pytest.raises(TransportError, match="exceeded 65536 bytes"):
        await client.start()
    assert client.health()["pid"] is None
    await client.close()


async def test_unsupported_protocol_version_is_refused(tmp_path: Path) -> None:
    script = FLOODER.replace("2024-11-05", "1999-01-01")
    client = ClaudeFlowClient(ClientSettings(
        command=[sys.executable, "-c", script], workdir=tmp_path / "w", start_timeout=10,
        backoff=0.01, ping_interval=0))
    with pytest.raises(TransportError, match="unsupported protocol version"):
        await client.start()
    await client.close()


def test_dialects_follow_the_listed_tools() -> None:
    v3 = {"swarm_init", "agent_spawn", "task_create", "task_assign", "swarm_status",
          "agent_list", "agent_status", "agent_health", "task_status", "swarm_shutdown", "other"}
    v2 = {"swarm_init", "agent_spawn", "task_orchestrate", "swarm_status", "agent_list",
          "agent_metrics", "task_status", "task_results", "swarm_destroy"}
    assert operations.detect_dialect(v3) == "v3"
    assert operations.detect_dialect(v2) == "v2"
    with pytest.raises(UnsupportedOperation):
        operations.detect_dialect(v3 - {"task_assign"})
    # v2's single orchestrate call carries what v3 splits over create + assign
    (step,) = operations.steps_for("v2", "task_orchestrate")
    assert step.build({"description": "d", "priority": "high", "agents": ["a"]}, []) == {
        "task": "d", "priority": "high"}
    assert step.build({"description": "d", "priority": "normal"}, [])["priority"] == "medium"
    create, assign = operations.steps_for("v3", "task_orchestrate")
    assert create.build({"description": "d"}, []) == {"type": "feature", "description": "d"}
    assert assign.build({"agents": []}, [{"taskId": "t1"}]) is None
    assert assign.build({"agents": ["a"]}, [{"taskId": "t1"}]) == {
        "taskId": "t1", "agentIds": ["a"]}
    assert {op for op in operations.OPERATIONS} == set(operations.V3) == set(operations.V2)


# A peer whose error replies carry a malformed code (a string); then it answers normally.
BAD_CODES = textwrap.dedent("""
    import json, sys
    for line in sys.stdin:
        msg = json.loads(line)
        if "id" not in msg:
            continue
        if msg.get("method") == "initialize":
            reply = {"result": {"protocolVersion": "2024-11-05", "capabilities": {},
                                "serverInfo": {"name": "bad-codes", "version": "0"}}}
        elif msg.get("method") == "broken":
            reply = {"error": {"code": "oops", "message": "it broke"}}
        else:
            reply = {"result": {"ok": True}}
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], **reply}), flush=True)
""")


async def test_malformed_error_code_is_an_error_not_a_lost_session(tmp_path: Path) -> None:
    session = StdioSession([sys.executable, "-c", BAD_CODES], cwd=tmp_path / "w")
    try:
        await session.start(timeout=10)
        with pytest.raises(RpcError, match="it broke") as err:
            await session.request("broken", None, timeout=10)
        assert err.value.code == -32603
        assert await session.request("fine", None, timeout=10) == {"ok": True}
        assert session.alive
    finally:
        await session.close()
