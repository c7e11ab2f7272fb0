"""Migration routes of the agent API: bad requests get a clear 4xx and change nothing."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from novacron.agent.config import AgentConfig
from novacron.agent.daemon import ForcedAccel, build_app
from novacron.agent.vm.manager import VMManager

TOKEN = "api-test-token"


async def test_migration_routes_validate_input(tmp_path: Path) -> None:
    cfg = AgentConfig(state_dir=tmp_path, token=TOKEN, cluster_secret="api-test-secret", data_port=0)
    accel = ForcedAccel(False)
    vms = VMManager(tmp_path, accel)
    await vms.load()
    server = TestServer(build_app(cfg, vms, accel), host="127.0.0.1", port=0)
    await server.start_server()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert cfg.data_port != 0  # the channel server bound a real port and reports it
        async with aiohttp.ClientSession(str(server.make_url(""))) as s:
            async def call(method: str, path: str, body: object = None, raw: bytes | None = None,
                           headers: dict[str, str] | None = None) -> tuple[int, dict]:
                kw: dict = {"headers": auth if headers is None else headers}
                if raw is not None:
                    kw["data"] = raw
                elif body is not None:
                    kw["json"] = body
                async with s.request(method, path, **kw) as r:
                    return r.status, await r.json()

            assert (await call("GET", "/v1/migrations", headers={}))[0] == 401
            target = {"url": "http://127.0.0.1:9", "token": "t"}
            cases = [
                (None, b"{nope", 400, "JSON"),
                ([1, 2], None, 400, "object"),
                ({"vm": "x", "target": target, "extra": 1}, None, 400, "unknown field"),
                ({"target": target}, None, 400, "'vm'"),
                ({"vm": "x", "target": {"url": "ftp://h"}}, None, 400, "target.url"),
                ({"vm": "x", "target": {"url": "http://h", "token": 5}}, None, 400, "target.token"),
                ({"vm": "x", "target": {"url": "http://h", "data_port": 70000}}, None, 400, "data_port"),
                ({"vm": "x", "target": target, "options": {"max_rounds": 0}}, None, 400, "max_rounds"),
                ({"vm": "x", "target": target, "options": {"warp": 9}}, None, 400, "unknown option"),
                ({"vm": "nosuchvm", "target": target}, None, 404, "nosuchvm"),
            ]
            for body, raw, status, words in cases:
                got, doc = await call("POST", "/v1/migrations", body, raw)
                assert got == status and words in doc["error"], (body, got, doc)
            assert (await call("POST", "/v1/migrations", raw=b"x" * 70_000))[0] == 413
            assert await call("GET", "/v1/migrations") == (200, {"migrations": []})
            got, doc = await call("GET", "/v1/migrations/abc")
            assert got == 404 and "abc" in doc["error"]
            assert (await call("POST", "/v1/migrations/abc/cancel"))[0] == 404
        assert vms.list() == [] and not (tmp_path / "incoming").exists()
    finally:
        await server.close()
