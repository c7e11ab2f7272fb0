"""Migration routes of the agent API: bad requests get a clear 4xx and change nothing."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from novacron.agent.config import AgentConfig
from novacron.agent.daemon import ForcedAccel, build_app
from novacron.agent.vm.manager import VMManager
from novacron.grants import GrantSigner

TOKEN = "api-test-token"


def grant(signer: GrantSigner, vm: str = "x", source: str = "api-a", **kw: object) -> str:
    fields: dict = {"migration": "m-1", "vm": vm, "source": source, "target": "api-b",
                    "url": "http://127.0.0.1:9", "data_host": "127.0.0.1", "data_port": 9, **kw}
    return signer.issue(**fields)


async def test_migration_routes_validate_input(tmp_path: Path) -> None:
    signer, stranger = GrantSigner.generate(), GrantSigner.generate()
    cfg = AgentConfig(state_dir=tmp_path, token=TOKEN, cluster_secret="api-test-secret", data_port=0,
                      name="api-a", grant_key=signer.public_key)
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
            g = grant(signer)
            cases = [
                (None, b"{nope", 400, "JSON"),
                ([1, 2], None, 400, "object"),
                ({"vm": "x", "grant": g, "extra": 1}, None, 400, "unknown field"),
                ({"grant": g}, None, 400, "'vm'"),
                ({"vm": "x"}, None, 400, "'grant'"),
                # a destination credential is no longer part of the contract
                ({"vm": "x", "grant": g, "target": {"url": "http://127.0.0.1:9", "token": "t"}},
                 None, 400, "only restate"),
                ({"vm": "x", "grant": g, "target": {"url": "http://127.0.0.1:8"}}, None, 403,
                 "not the destination the coordinator authorised"),
                ({"vm": "x", "grant": grant(stranger)}, None, 403, "signature"),
                ({"vm": "x", "grant": g[:-4] + "AAAA"}, None, 403, "signature"),
                ({"vm": "x", "grant": grant(signer, ttl_s=-1)}, None, 403, "expired"),
                ({"vm": "x", "grant": grant(signer, source="api-c")}, None, 403, "leaving 'api-c'"),
                ({"vm": "y", "grant": g}, None, 403, "for VM 'x'"),
                ({"vm": "x", "grant": g, "options": {"max_rounds": 0}}, None, 400, "max_rounds"),
                ({"vm": "x", "grant": g, "options": {"warp": 9}}, None, 400, "unknown option"),
                ({"vm": "nosuchvm", "grant": grant(signer, vm="nosuchvm")}, None, 404, "nosuchvm"),
            ]
            for body, raw, status, words in cases:
                got, doc = await call("POST", "/v1/migrations", body, raw)
                assert got == status and words in doc["error"], (body, got, doc)
            assert (await call("POST", "/v1/migrations", raw=b"x" * 70_000))[0] == 413
            assert await call("GET", "/v1/migrations") == (200, {"migrations": []})
            got, doc = await call("GET", "/v1/migrations/abc")
            assert got == 404 and "abc" in doc["error"]
            assert (await call("POST", "/v1/migrations/abc/cancel"))[0] == 404
            got, doc = await call("PATCH", "/v1/migrations/abc", {"bandwidth_mbps": 1})
            assert got == 404 and "abc" in doc["error"]
            assert (await call("PATCH", "/v1/migrations/abc", raw=b"{nope"))[0] == 400
            got, doc = await call("POST", "/v1/migrations", {"vm": "x", "grant": g, "options": {
                "on_no_converge": "postcopy", "test_digest": True}})
            assert got == 400 and "test_digest" in doc["error"], doc
            got, doc = await call("POST", "/v1/migrations", {"vm": "x", "grant": g, "options": {
                "on_no_converge": "later"}})
            assert got == 400 and "'abort', 'force' or 'postcopy'" in doc["error"], doc
        assert vms.list() == [] and not (tmp_path / "incoming").exists()
    finally:
        await server.close()
