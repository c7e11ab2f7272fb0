"""The OpenAPI document matches the routes, and fuzzing it never produces a 5xx."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import jsonschema
import pytest

from novacron.coordinator.api.openapi import API_PREFIX
from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.conftest import Coordinator
from tests.coordinator.fake_agent import FakeAgent, register_all, serving


async def test_document_lists_exactly_the_served_routes(coordinator: Coordinator) -> None:
    async with coordinator.session.get(coordinator.url + "/api/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = coordinator.server.app
    assert app is not None
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"
              and r.resource.canonical.startswith(API_PREFIX)}
    assert documented == served
    assert doc["openapi"].startswith("3.")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for _code, response in op["responses"].items():
                for content in response.get("content", {}).values():
                    jsonschema.Draft202012Validator.check_schema(content["schema"])
            if path != "/api/v1/health" and not path.endswith("openapi.json"):
                assert op["security"] == [{"bearer": []}], (method, path)
                assert "401" in op["responses"]


@pytest.mark.slow
@pytest.mark.e2e
async def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    """Fuzz every documented route of a real coordinator subprocess with a small fleet.

    Routes of this module's resources (meta, hosts, vms, migrations) must never
    answer 5xx. Other features' routes may answer a 5xx they document (e.g. 503
    while a dependency is unavailable), but never an undocumented status, and
    nothing may raise an unhandled error (the only source of 500s).
    """
    fakes = [FakeAgent("alpha", "tok-alpha-s-per-host-token"), FakeAgent("beta", "tok-beta-s-per-host-token", 4 << 30)]
    # the fakes are served by this test's loop while schemathesis runs
    async with LocalCoordinator(tmp_path / "coord") as coord, serving(*fakes):
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await register_all(client, fakes, coord.agent_token)
            await client.create_vm({"name": "seed", "vcpus": 1, "memory_mb": 64,
                                    "kernel": "/k"})

        async def run(token: str, checks: str, *select: str) -> None:
            argv = [sys.executable, "-m", "schemathesis.cli", "run",
                    f"{coord.url}/api/v1/openapi.json", "--checks", checks,
                    "--max-examples", "20", "--seed", "5", "--workers", "1",
                    "--phases", "examples,coverage,fuzzing", "--request-timeout", "20",
                    "--generation-database", "none", "--no-color",
                    "-H", f"Authorization: Bearer {token}", *select]
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            try:
                raw, _ = await asyncio.wait_for(proc.communicate(), 300)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            out = raw.decode(errors="replace")
            assert proc.returncode == 0, out[-6000:]
            assert "Tested:" in out
            assert token not in out

        agent_routes = "/hosts/(register|\\{name\\}/heartbeat)$"
        mine = "^(meta|hosts|vms|migrations)$"
        strict = ("not_a_server_error,status_code_conformance,content_type_conformance,"
                  "response_schema_conformance")
        await run(coord.admin_token, strict, "--include-tag-regex", mine,
                  "--exclude-path-regex", agent_routes)
        await run(coord.agent_token, strict, "--include-path-regex", agent_routes)
        await run(coord.admin_token, "status_code_conformance,content_type_conformance",
                  "--exclude-tag-regex", mine)
        # The fuzzer got past validation to the agents (creates, stops, deletes ...).
        agent_calls = [c for f in fakes for c in f.calls if c[1] != "/v1/host"]
        assert len(agent_calls) > 5, agent_calls
        log = coord.log_path.read_text()
        assert '"unhandled error"' not in log, log[-4000:]
        assert coord.admin_token not in log and coord.agent_token not in log
