"""The coordinator's swarm API and bridge health, with the real claude-flow behind them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from novacron import config
from novacron.coordinator.config import CoordinatorConfig, McpConfig, check_config
from novacron.coordinator.service import build_app
from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator

pytestmark = [pytest.mark.e2e]

PLAN = {
    "topology": "hierarchical", "strategy": "specialized", "max_agents": 4,
    "agents": [{"type": "coder"}, {"type": "tester"}],
    "tasks": [{"description": "write the migration dashboard", "type": "feature",
               "priority": "high"},
              {"description": "test the migration dashboard"}],
}


@pytest.fixture
async def coord(tmp_path: Path, claude_flow_argv: list[str]) -> AsyncIterator[Coordinator]:
    c = await start_coordinator(make_cfg(tmp_path / "coord", mcp=McpConfig(
        ping_interval_s=0.3, call_timeout_s=20)))
    try:
        yield c
    finally:
        await stop_coordinator(c)


async def _wait_for(c: Coordinator, check: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, health = await c.call("GET", "/mcp/health")
        assert status == 200
        if check(health):
            return health
        assert asyncio.get_running_loop().time() < deadline, health
        await asyncio.sleep(0.1)


async def test_swarm_lifecycle_and_health(coord: Coordinator) -> None:
    status, health = await coord.call("GET", "/mcp/health")
    assert status == 200 and health["enabled"] and health["status"] == "idle"

    status, swarm = await coord.call("POST", "/swarms", json={
        "description": "build and test the migration dashboard", "plan": PLAN})
    assert status == 201, swarm
    assert len(swarm["agents"]) == 2 and len(swarm["tasks"]) == 2
    assert swarm["plan"] == PLAN and swarm["status"] == "running"
    sid = swarm["id"]

    status, listed = await coord.call("GET", "/swarms")
    assert [s["id"] for s in listed["swarms"]] == [sid]

    status, one = await coord.call("GET", f"/swarms/{sid}")
    assert status == 200
    assert one["live"]["swarmId"] == sid and one["live"]["agentCount"] >= 2
    assert [t["taskId"] for t in one["task_states"]] == swarm["tasks"]
    assert {t["status"] for t in one["task_states"]} == {"in_progress"}

    # the health loop pings on its own once the bridge is in use
    health = await _wait_for(coord, lambda h: h["last_ping_ms"] is not None)
    assert health["status"] == "ok" and health["dialect"] == "v3"
    assert health["active"] == {"swarm": 1, "agent": 2, "task": 2}

    # kill claude-flow: the health check notices and restarts it without any API call
    os.killpg(health["pid"], signal.SIGKILL)
    health = await _wait_for(coord, lambda h: h["restarts"] >= 1 and h["status"] == "ok"
                             and h["pid"] not in (None, health["pid"]))
    status, again = await coord.call("GET", f"/swarms/{sid}")
    assert status == 200 and again["live"]["swarmId"] == sid

    # without a plan, the classifier plans the swarm from the description
    text = "Add a health endpoint to the agent API"
    status, auto = await coord.call("POST", "/swarms", json={"description": text})
    assert status == 201, auto
    assert auto["plan"]["label"] in ("simple", "medium", "complex", "very-complex")
    assert len(auto["agents"]) == auto["plan"]["agent_count"] and len(auto["tasks"]) == 1
    status, one = await coord.call("GET", f"/swarms/{auto['id']}")
    assert one["task_states"][0]["status"] == "in_progress"
    status, listed = await coord.call("GET", "/swarms")
    assert [s["id"] for s in listed["swarms"]] == [sid, auto["id"]]

    # shutting a swarm down ends it in claude-flow and in the bridge's records
    status, ended = await coord.call("DELETE", f"/swarms/{sid}")
    assert status == 200 and ended["status"] == "shutdown"
    status, one = await coord.call("GET", f"/swarms/{sid}")
    assert one["live"]["status"] == "terminated" and one["status"] == "terminated"
    status, health = await coord.call("GET", "/mcp/health")
    assert health["active"]["swarm"] == 1  # the classifier-planned one is still running
    assert (await coord.call("DELETE", "/swarms/swarm-unknown"))[0] == 404

    status, doc = await coord.call("GET", "/openapi.json")
    for path in ("/api/v1/swarms", "/api/v1/swarms/{id}", "/api/v1/mcp/health"):
        assert path in doc["paths"]


async def test_bad_requests_change_nothing(coord: Coordinator) -> None:
    bad_bodies: list[Any] = [
        {},
        {"description": ""},
        {"description": "x", "plan": {**PLAN, "topology": "blob"}},
        {"description": "x", "plan": {**PLAN, "agents": []}},
        {"description": "x", "plan": {**PLAN, "agents": [{"type": "a b"}]}},
        {"description": "x", "extra": 1},
    ]
    for body in bad_bodies:
        status, doc = await coord.call("POST", "/swarms", json=body)
        assert status == 400, (body, doc)
        assert doc["error"].startswith("body")
    # the classifier refuses a blank description before anything reaches claude-flow
    status, doc = await coord.call("POST", "/swarms", json={"description": "   "})
    assert status == 400 and "empty" in doc["error"]
    status, doc = await coord.call("GET", "/swarms/swarm-unknown")
    assert status == 404
    status, doc = await coord.call("GET", "/swarms", token="wrong")
    assert status == 401
    assert (await coord.call("GET", "/swarms"))[1] == {"swarms": []}
    status, health = await coord.call("GET", "/mcp/health")
    assert health["status"] == "idle" and health["pid"] is None  # nothing was started


def test_bad_bridge_settings_stop_the_coordinator(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="attempts"):
        build_app(make_cfg(tmp_path, mcp=McpConfig(attempts=0)))
    tokens = {"NOVACRON_COORDINATOR_ADMIN_TOKEN": "a" * 16, "NOVACRON_COORDINATOR_AGENT_TOKEN": "b" * 16}
    for value in ("0", "three"):
        environ = {**tokens, "NOVACRON_COORDINATOR_MCP_ATTEMPTS": value}
        with pytest.raises(config.ConfigError, match="NOVACRON_COORDINATOR_MCP_ATTEMPTS"):
            config.load(CoordinatorConfig, env_prefix="NOVACRON_COORDINATOR", environ=environ,
                        check=check_config)


# An MCP peer whose agent_spawn always fails, to show a half-run plan is undone. (The real
# claude-flow accepts any agent, so it cannot show this.) It logs each tool call to a file.
FAILING_PEER = """
import json, sys
TOOLS = ["swarm_init", "agent_spawn", "task_create", "task_assign", "swarm_status",
         "agent_list", "agent_status", "agent_health", "task_status", "swarm_shutdown"]
log = open(sys.argv[1], "a")
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method, result = msg["method"], {}
    if method == "initialize":
        result = {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                  "serverInfo": {"name": "failing-peer", "version": "0"}}
    elif method == "tools/list":
        result = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in TOOLS]}
    elif method == "tools/call":
        name = msg["params"]["name"]
        log.write(name + "\\n"); log.flush()
        doc = {"success": True, "swarmId": "swarm-1", "status": "running"}
        if name == "agent_spawn":
            doc = {"success": False, "error": "agent pool exhausted"}
        result = {"content": [{"type": "text", "text": json.dumps(doc)}]}
    print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}), flush=True)
"""


async def test_failed_plan_is_undone(tmp_path: Path) -> None:
    peer, calls = tmp_path / "peer.py", tmp_path / "calls.log"
    peer.write_text(FAILING_PEER)
    mcp = McpConfig(command=[sys.executable, str(peer), str(calls)])
    c = await start_coordinator(make_cfg(tmp_path / "coord", mcp=mcp))
    try:
        status, doc = await c.call("POST", "/swarms", json={"description": "x", "plan": PLAN})
        assert status == 502 and "agent pool exhausted" in doc["error"]
        assert "shut down" in doc["error"]
        assert calls.read_text().split() == ["swarm_init", "agent_spawn", "swarm_shutdown"]
        status, listed = await c.call("GET", "/swarms")
        assert [(s["id"], s["status"]) for s in listed["swarms"]] == [("swarm-1", "failed")]
        assert "agent pool exhausted" in listed["swarms"][0]["error"]
    finally:
        await stop_coordinator(c)
