"""The bridge against the real claude-flow MCP server installed by `make claude-flow`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from novacron.coordinator.mcp.client import ClaudeFlowClient, ClientSettings, clear_stale_locks
from novacron.coordinator.mcp.errors import ArgumentError, RpcError, ToolError, TransportError
from novacron.coordinator.mcp.registry import BridgeRegistry
from novacron.coordinator.store.sqlite import SQLiteStore

pytestmark = [pytest.mark.e2e]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_eight_operations(claude_flow: ClaudeFlowClient) -> None:
    c = claude_flow
    health = c.health()
    assert health["status"] == "ok" and health["dialect"] == "v3"
    assert health["server"]["name"] and health["tools"] > 100

    swarm = await c.swarm_init("mesh", 4, "balanced")  # 1 swarm init
    sid = swarm["swarmId"]
    assert swarm["topology"] == "mesh" and swarm["maxAgents"] == 4

    agent = await c.agent_spawn("coder", swarm_id=sid)  # 2 agent spawn
    aid = agent["agentId"]
    assert agent["agentType"] == "coder"

    task = await c.task_orchestrate("index the fleet's VM images", task_type="research",  # 3
                                    priority="high", agents=[aid])
    tid = task["taskId"]
    assert task["assignedTo"] == [aid] and task["priority"] == "high"

    status = await c.swarm_status(sid)  # 4 swarm status
    assert status["swarmId"] == sid and status["agentCount"] >= 1

    agents = await c.agent_list()  # 5 agent list
    assert aid in [a["agentId"] for a in agents["agents"]]

    metrics = await c.agent_metrics(aid)  # 6 agent metrics (agent_status + agent_health)
    assert metrics["agentId"] == aid and "health" in metrics and "healthy" in metrics

    tstatus = await c.task_status(tid)  # 7 task status
    assert tstatus["taskId"] == tid and tstatus["status"] == "in_progress"

    await c.call_tool("task_complete", {"taskId": tid, "result": {"images": 3}})
    results = await c.task_results(tid)  # 8 task results
    assert results == {"taskId": tid, "status": "completed", "result": {"images": 3}}

    # everything the bridge created is tracked, with its latest known state
    tracked = await c.registry.get("task", tid)
    assert tracked is not None and tracked["status"] == "completed"
    assert tracked["result"] == {"images": 3}
    assert [s["id"] for s in await c.registry.list("swarm")] == [sid]
    assert (await c.registry.get("agent", aid) or {}).get("swarm_id") == sid


async def test_failures_are_parsed_and_not_retried(claude_flow: ClaudeFlowClient) -> None:
    c = claude_flow
    starts = c.health()["starts"]
    with pytest.raises(ToolError, match="not found"):
        await c.task_status("task-that-does-not-exist")  # {"status": "not_found", "error": ...}
    with pytest.raises(ToolError, match="validation"):
        await c.agent_metrics("")  # the server's own {"success": false, "error": ...}
    with pytest.raises(ArgumentError, match="agentId"):
        await c.call_tool("agent_status", {"agentId": 42})  # checked against inputSchema first
    with pytest.raises(ArgumentError, match="taskId"):
        await c.call_tool("task_assign", {})
    with pytest.raises(RpcError) as err:
        await c.request("tools/call", {"name": "no_such_tool", "arguments": {}})
    assert err.value.code == -32601
    assert c.health()["starts"] == starts  # none of these restarted anything


async def test_killed_server_recovers_mid_session(claude_flow: ClaudeFlowClient) -> None:
    c = claude_flow
    swarm = await c.swarm_init("star", 3, "specialized")
    first_pid = c.pid
    assert first_pid is not None

    os.killpg(first_pid, signal.SIGKILL)  # the server and anything it started
    # Killed while holding its state lock (this happens for real when a call is in flight):
    # claude-flow would refuse every call of its successor for 30 s unless the bridge clears it.
    lock = c.settings.workdir / ".claude-flow" / "policy" / "state.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": first_pid, "acquiredAt": int(time.time() * 1000)}))
    # The very next call finds the session dead, restarts and re-initializes, and succeeds.
    status = await c.swarm_status(swarm["swarmId"])
    assert status["swarmId"] == swarm["swarmId"]  # claude-flow's own state survived in workdir
    assert c.pid is not None and c.pid != first_pid
    assert c.health()["restarts"] == 1 and c.health()["status"] == "ok"
    await asyncio.sleep(0.1)
    assert _gone(first_pid) and not lock.exists()

    # A call in flight when the server dies is retried on a fresh server.
    second_pid = c.pid
    assert second_pid is not None
    call = asyncio.create_task(c.agent_list())
    await asyncio.sleep(0)
    os.killpg(second_pid, signal.SIGKILL)
    listed = await call
    assert "agents" in listed
    assert c.pid not in (None, first_pid, second_pid)


@pytest.mark.slow
async def test_hung_server_times_out_and_is_replaced(claude_flow_argv: list[str],
                                                     tmp_path: Path) -> None:
    client = ClaudeFlowClient(ClientSettings(
        command=claude_flow_argv, workdir=tmp_path / "cf", call_timeout=1.5, ping_timeout=1.0,
        ping_interval=0, backoff=0.05))
    async with client:
        hung = client.pid
        assert hung is not None
        os.killpg(hung, signal.SIGSTOP)  # alive but silent
        try:
            await client.check_health()  # ping times out -> down -> restarted
            assert client.health()["restarts"] == 1
            assert "ping" in client.health()["last_error"]
            assert client.pid not in (None, hung)
            await client.check_health()
            assert client.health()["status"] == "ok"
            assert client.health()["last_ping_ms"] is not None

            hung = client.pid
            assert hung is not None
            os.killpg(hung, signal.SIGSTOP)
            # attempt 1 times out, the server is replaced, attempt 2 answers
            result = await client.swarm_init("ring", 2)
            assert result["topology"] == "ring"
            assert client.health()["restarts"] == 2
        finally:
            for pid in (hung,):
                if not _gone(pid):
                    os.killpg(pid, signal.SIGKILL)
    assert client.health()["status"] == "stopped"


async def test_gives_up_after_three_attempts(tmp_path: Path) -> None:
    # A server that exits at once: every attempt is a transport failure, and the error
    # carries its last words from stderr.
    script = "import sys; print('no config here', file=sys.stderr); sys.exit(3)"
    client = ClaudeFlowClient(ClientSettings(
        command=[sys.executable, "-c", script], workdir=tmp_path / "x", start_timeout=5,
        backoff=0.01, ping_interval=0))
    with pytest.raises(TransportError, match=r"after 3 attempts.*code 3: no config here"):
        await client.start()
    assert client.health()["status"] == "down" and client.health()["starts"] == 0
    await client.close()


async def test_registry_persists_in_the_coordinator_store(claude_flow_argv: list[str],
                                                          tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "coordinator.db")
    await store.open()
    try:
        client = ClaudeFlowClient(
            ClientSettings(command=claude_flow_argv, workdir=tmp_path / "cf", ping_interval=0),
            BridgeRegistry(store))
        async with client:
            swarm = await client.swarm_init("hierarchical", 2)
            agent = await client.agent_spawn("tester", swarm_id=swarm["swarmId"])
    finally:
        await store.close()
    reopened = SQLiteStore(tmp_path / "coordinator.db")
    await reopened.open()
    try:
        registry = BridgeRegistry(reopened)
        swarms = await registry.list("swarm", active_only=True)
        assert [s["id"] for s in swarms] == [swarm["swarmId"]]
        assert swarms[0]["topology"] == "hierarchical"
        assert (await registry.get("agent", agent["agentId"]) or {})["type"] == "tester"
    finally:
        await reopened.close()


def test_only_locks_of_dead_owners_are_cleared(tmp_path: Path) -> None:
    policy = tmp_path / ".claude-flow" / "policy"
    policy.mkdir(parents=True)
    mine = policy / "live.lock"
    mine.write_text(json.dumps({"pid": os.getpid()}))
    garbage = policy / "garbage.lock"
    garbage.write_text("not json")
    dead_pid = os.fork()
    if dead_pid == 0:
        os._exit(0)
    os.waitpid(dead_pid, 0)
    stale = policy / "state.lock"
    stale.write_text(json.dumps({"pid": dead_pid, "acquiredAt": 1}))
    assert clear_stale_locks(tmp_path) == [stale]
    assert mine.exists() and garbage.exists() and not stale.exists()
    assert clear_stale_locks(tmp_path / "elsewhere") == []
