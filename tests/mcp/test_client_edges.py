"""Client edges that claude-flow never shows: misbehaving peers and dialect choice."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from novacron.coordinator.mcp import operations, stdio_session
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


# A peer that sends a flood of pings without reading its stdin until ``flag`` exists,
# then counts our answers and reports them when asked "count".
FLOOD = textwrap.dedent("""
    import json, os, sys, time
    flag, n = sys.argv[1], int(sys.argv[2])
    init = json.loads(sys.stdin.readline())
    print(json.dumps({"jsonrpc": "2.0", "id": init["id"], "result": {
        "protocolVersion": "2024-11-05", "capabilities": {},
        "serverInfo": {"name": "flood", "version": "0"}}}), flush=True)
    for i in range(n):
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": f"p{i}", "method": "ping"}) + "\\n")
    print(json.dumps({"jsonrpc": "2.0", "method": "notifications/flooded"}), flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)  # a peer that does not read what it is sent
    results = errors = 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("method") == "count":
            print(json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                              "result": {"results": results, "errors": errors}}), flush=True)
        elif "error" in msg:
            errors += 1
        elif "result" in msg:
            results += 1
""")


async def test_server_request_flood_is_bounded(tmp_path: Path) -> None:
    flag, pings = tmp_path / "read-now", 8000  # far more answers than the pipes hold
    flooded = asyncio.Event()
    session = StdioSession([sys.executable, "-c", FLOOD, str(flag), str(pings)], cwd=tmp_path / "w",
                           on_notification=lambda method, _params: flooded.set())
    try:
        await session.start(timeout=10)
        most = 0
        for _ in range(3000):  # bounded: until every ping has been read
            most = max(most, len(session._answering))
            if flooded.is_set():
                break
            await asyncio.sleep(0.01)
        assert flooded.is_set()
        assert session.refused_server_requests > 0
        assert most <= stdio_session.MAX_SERVER_REQUESTS
        assert len(session._answering) <= stdio_session.MAX_SERVER_REQUESTS
        flag.touch()
        counts = await session.request("count", None, timeout=20)
        # every ping got exactly one answer: a pong or a busy error
        assert counts["results"] + counts["errors"] == pings
        assert counts["errors"] == session.refused_server_requests
        assert counts["results"] >= stdio_session.MAX_SERVER_REQUESTS
    finally:
        await session.close()


async def test_close_cancels_answers_in_flight(tmp_path: Path) -> None:
    session = StdioSession([sys.executable, "-c", FLOOD, str(tmp_path / "never"), "8000"], cwd=tmp_path / "w")
    try:
        await session.start(timeout=10)
        for _ in range(1000):  # bounded: until answers are stuck on the unread pipe
            if len(session._answering) == stdio_session.MAX_SERVER_REQUESTS:
                break
            await asyncio.sleep(0.01)
        stuck = set(session._answering)
        assert stuck
    finally:
        await session.close(grace=0.5)
    assert all(task.done() for task in stuck)
    assert not session._answering
