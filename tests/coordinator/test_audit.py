"""The audit log through real daemons: what gets recorded, what never does, and the queries."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from novacron import audit
from novacron.agent.config import AgentConfig
from novacron.agent.daemon import ForcedAccel
from novacron.agent.daemon import build_app as build_agent_app
from novacron.agent.vm.manager import VMManager
from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent
from tests.coordinator.test_api import vm_spec


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def coordinator_audit(c: Coordinator) -> Path:
    return c.cfg.data_dir / "audit.log"


async def test_changes_are_recorded_with_who_what_where_and_result(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    body_secret = "hunter2-" + secrets.token_hex(6)  # in a request body, registered nowhere
    status, vm = await coordinator.call("POST", "/vms", json=vm_spec("web", cmdline=f"pw={body_secret}"))
    assert status == 201, vm
    assert (await coordinator.call("POST", "/vms/web/stop"))[0] == 200
    refused_move, _ = await coordinator.call("POST", "/migrations", json={"vm": "web", "target": "nosuch"})
    assert refused_move in (404, 409)  # stopped VM, unknown host: either way a 4xx
    assert (await coordinator.call("DELETE", "/vms/web"))[0] == 200
    assert (await coordinator.call("DELETE", "/vms/ghost"))[0] == 404
    assert (await coordinator.call("DELETE", "/hosts/beta"))[0] == 200
    for path in ("/hosts", "/vms", "/hosts/alpha", "/migrations"):  # reads are not recorded
        assert (await coordinator.call("GET", path))[0] == 200
    status, _ = await coordinator.call("POST", "/hosts/alpha/heartbeat", token=agents[0].token,
                                       json={"memory_available_bytes": 1 << 30})
    assert status == 200  # telemetry: not recorded either

    raw = coordinator_audit(coordinator).read_text()
    assert body_secret not in raw and coordinator.cfg.admin_token not in raw
    assert all(fake.token not in raw for fake in agents)  # their registration bodies carry them
    got = [(e["actor"], e["action"], e["target"], e["result"], e["status"]) for e in audit_lines(coordinator_audit(coordinator))]
    assert got == [
        ("agent", "POST /api/v1/hosts/register", "alpha", "ok", 200),
        ("agent", "POST /api/v1/hosts/register", "beta", "ok", 200),
        ("admin", "POST /api/v1/vms", "web", "ok", 201),
        ("admin", "POST /api/v1/vms/{name}/stop", "web", "ok", 200),
        ("admin", "POST /api/v1/migrations", "web -> nosuch", "error", refused_move),
        ("admin", "DELETE /api/v1/vms/{name}", "web", "ok", 200),
        ("admin", "DELETE /api/v1/vms/{name}", "ghost", "error", 404),
        ("admin", "DELETE /api/v1/hosts/{name}", "beta", "ok", 200),
    ]
    for e in audit_lines(coordinator_audit(coordinator)):
        assert e["remote"] == "127.0.0.1"
        assert datetime.fromisoformat(e["time"]).utcoffset() is not None, e["time"]

    # the query endpoint: newest first, filters, admin only
    status, doc = await coordinator.call("GET", "/audit")
    assert status == 200 and [e["target"] for e in doc["entries"]][:2] == ["beta", "ghost"]
    status, doc = await coordinator.call("GET", "/audit?actor=agent")
    assert [e["target"] for e in doc["entries"]] == ["beta", "alpha"]
    status, doc = await coordinator.call("GET", "/audit?action=delete&target=web")
    assert [e["action"] for e in doc["entries"]] == ["DELETE /api/v1/vms/{name}"]
    status, doc = await coordinator.call("GET", "/audit?result=error&limit=1")
    assert [e["target"] for e in doc["entries"]] == ["ghost"]
    status, doc = await coordinator.call("GET", "/audit?since=2999-01-01T00:00:00Z")
    assert (status, doc) == (200, {"entries": []})
    status, doc = await coordinator.call("GET", "/audit?since=yesterday")
    assert status == 400 and "since" in doc["error"]
    assert (await coordinator.call("GET", "/audit?limit=1001"))[0] == 400
    assert (await coordinator.call("GET", "/audit", token=coordinator.cfg.agent_token))[0] == 401
    assert (await coordinator.call("GET", "/audit?host=nosuch"))[0] == 404
    last = audit_lines(coordinator_audit(coordinator))[-1]  # the refused read is recorded
    assert (last["actor"], last["action"], last["result"]) == ("-", "GET /api/v1/audit", "refused")

    # the MCP endpoint authenticates with the admin token too
    async with coordinator.session.post(coordinator.url + "/mcp", headers=coordinator.headers(), json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "audit-test", "version": "1"}}}) as resp:
        assert resp.status == 200
    last = audit_lines(coordinator_audit(coordinator))[-1]
    assert (last["actor"], last["action"], last["result"]) == ("admin", "POST /mcp", "ok")


async def test_refused_authentications_are_recorded_and_a_burst_stays_bounded(tmp_path: Path) -> None:
    c = await start_coordinator(make_cfg(tmp_path / "coord"))
    wrong = "wrong-" + secrets.token_hex(8)
    try:
        status, _ = await c.call("POST", "/vms", token=wrong, json=vm_spec("x"))
        assert status == 401
        first = audit_lines(coordinator_audit(c))
        assert [(e["actor"], e["remote"], e["action"], e["result"], e["status"]) for e in first] == [
            ("-", "127.0.0.1", "POST /api/v1/vms", "refused", 401)]

        async def refused(n: int) -> None:
            async with c.session.get(c.url + "/api/v1/hosts", headers=c.headers(wrong)) as resp:
                assert resp.status == 401
            async with c.session.delete(c.url + f"/api/v1/hosts/h{n}") as resp:  # no token at all
                assert resp.status == 401

        for batch in range(0, 500, 50):
            await asyncio.gather(*(refused(n) for n in range(batch, batch + 50)))
        lines = audit_lines(coordinator_audit(c))
        assert len(lines) == audit.REFUSED_PER_WINDOW
        assert (await c.call("GET", "/hosts"))[0] == 200  # the admin is not locked out
    finally:
        await stop_coordinator(c)  # shutdown writes the pending summary
    lines = audit_lines(coordinator_audit(c))
    summary = lines[-1]
    assert (summary["action"], summary["remote"], summary["result"]) == (audit.SUPPRESSED_ACTION, "127.0.0.1", "refused")
    assert summary["suppressed"] == 1 + 1000 - audit.REFUSED_PER_WINDOW
    assert len(lines) == audit.REFUSED_PER_WINDOW + 1
    assert wrong not in coordinator_audit(c).read_text()


async def test_agent_records_its_own_changes_and_the_coordinator_reads_them(
        coordinator: Coordinator, tmp_path: Path) -> None:
    token = "agent-api-" + secrets.token_hex(8)
    state = tmp_path / "agent"
    cfg = AgentConfig(state_dir=state, token=token, cluster_secret="audit-test-secret", data_port=0,
                      audit_file=tmp_path / "agent-audit" / "audit.log")
    accel = ForcedAccel(False)
    vms = VMManager(state, accel)
    await vms.load()
    server = TestServer(build_agent_app(cfg, vms, accel), host="127.0.0.1", port=0)
    await server.start_server()
    peer_token = "peer-" + secrets.token_hex(8)
    try:
        url = str(server.make_url("")).rstrip("/")
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(url) as s:
            async def call(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> int:
                async with s.request(method, path, json=body, headers=auth if headers is None else headers) as r:
                    await r.read()
                    return r.status

            assert await call("POST", "/v1/vms", {"name": "bad", "vcpus": 1}) == 400
            assert await call("DELETE", "/v1/vms/ghost") == 404
            assert await call("POST", "/v1/vms/ghost/start") == 404
            # a forged grant: refused, and the credential-like value never reaches the file
            assert await call("POST", "/v1/migrations", {"vm": "ghost", "grant": "forged." + peer_token}) == 403
            assert await call("GET", "/v1/vms") == 200
            assert await call("POST", "/v1/vms", {"name": "x"}, headers={"Authorization": "Bearer nope"}) == 401
        path = tmp_path / "agent-audit" / "audit.log"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        raw = path.read_text()
        assert peer_token not in raw and token not in raw
        got = [(e["actor"], e["action"], e["target"], e["result"], e["status"]) for e in audit_lines(path)]
        assert got == [
            ("api-token", "POST /v1/vms", "bad", "error", 400),
            ("api-token", "DELETE /v1/vms/{name}", "ghost", "error", 404),
            ("api-token", "POST /v1/vms/{name}/start", "ghost", "error", 404),
            ("api-token", "POST /v1/migrations", "ghost", "refused", 403),
            ("-", "POST /v1/vms", "-", "refused", 401),
        ]
        # the coordinator reads a registered host's audit through its agent
        reg = {"name": "real", "url": url, "token": token, "cpus": 1, "memory_bytes": 1 << 30,
               "memory_available_bytes": 1 << 29}
        assert (await coordinator.call("POST", "/hosts/register", token=coordinator.cfg.agent_token, json=reg))[0] == 200
        status, doc = await coordinator.call("GET", "/audit?host=real&target=ghost&limit=2")
        assert status == 200, doc
        assert [e["action"] for e in doc["entries"]] == ["POST /v1/migrations", "POST /v1/vms/{name}/start"]
    finally:
        await server.close()


async def test_cli_prints_the_audit_log(coordinator: Coordinator, agents: list[FakeAgent], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    env.update(NOVACRON_SERVER=coordinator.url, NOVACRON_TOKEN=coordinator.cfg.admin_token,
               HOME=str(tmp_path), COLUMNS="200")

    async def cli(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "novacron.cli.main", "audit", *argv, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli()
    assert code == 0, err
    assert "Audit log" in out and "POST /api/v1/hosts/register" in out and "alpha" in out and "ok 200" in out
    code, out, err = await cli("--json", "--target", "beta")
    assert code == 0, err
    assert [(e["actor"], e["target"]) for e in json.loads(out)] == [("agent", "beta")]
    code, out, err = await cli("--since", "not-a-time")
    assert code == 1 and "since" in err
